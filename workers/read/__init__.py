"""READ (LLaVA-1.5 + SAM with similarity-as-points) inference, built on transformers' model classes.

Modules, one concept each: ``errors`` (typed failures), ``config`` (the checkpoint's settings), ``sam_keys``
(segment-anything ↔ transformers weight names), ``loader`` (checkpoint folder → :class:`model.ReadModel`),
``tokenizer`` (the released SentencePiece tokenizer, ids exactly as READ's), ``conversation`` (prompt text
and token ids), ``preprocess`` (CLIP and SAM image inputs), ``decode`` (batched
prefill, greedy generation and teacher forcing), ``sasp`` (similarity as points), ``prompting`` (SAM prompts and
mask decoding), ``tiny`` (random-weight checkpoints for tests) and ``detector`` (the ``read``, ``lisa``
and ``read_as_published`` detectors). See docs/DESIGN.md section 5.
"""

# Generation caps: READ/LISA's chat and evaluation scripts stop at 32 new tokens; the original READAR scripts
# allowed 2,048 (the language model's context is 4,096 tokens).
MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_CAP = 2048
