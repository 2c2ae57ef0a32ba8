"""READ (LLaVA-1.5 + SAM with similarity-as-points) inference, built on transformers' model classes.

Modules, one concept each: ``errors`` (typed failures), ``config`` (the checkpoint's settings), ``sam_keys``
(segment-anything ↔ transformers weight names), ``loader`` (checkpoint folder → :class:`model.ReadModel`),
``conversation`` (prompt text and token ids), ``preprocess`` (CLIP and SAM image inputs), ``decode`` (batched
prefill, greedy generation and teacher forcing), ``sasp`` (similarity as points), ``prompting`` (SAM prompts and
mask decoding), ``tiny`` (random-weight checkpoints for tests) and ``detector`` (the ``read`` / ``lisa``
detectors). See DESIGN.md section 5.
"""
