"""READ (LLaVA-1.5 + SAM with similarity-as-points) and LISA (LLaVA v1 + SAM) inference, built on transformers'
model classes; both families load through the same code, told apart by their config.json (``config``).

Modules, one concept each: ``errors`` (typed failures), ``config`` (the checkpoint's settings), ``sam_keys``
(segment-anything ↔ transformers weight names), ``loader`` (checkpoint folder → :class:`model.ReadModel`),
``tokenizer`` (the released SentencePiece tokenizer, ids exactly as READ's), ``conversation`` (prompt text
and token ids), ``preprocess`` (CLIP and SAM image inputs), ``decode`` (batched
prefill, greedy generation and teacher forcing), ``sasp`` (similarity as points), ``prompting`` (SAM prompts and
mask decoding), ``tiny`` (random-weight checkpoints for tests) and ``detector`` (the ``read``, ``lisa``
and ``read_as_published`` detectors). See docs/DESIGN.md section 5.
"""

# Generation caps: 32 new tokens is the default of READ's and LISA's ``evaluate`` (LISA's chat.py passes 512, and
# LISA's own validation does not generate: it teacher-forces "[SEG]."); the original READAR scripts allowed 2,048
# (READ's language model has a 4,096-token context, LISA-7B's 2,048).
MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_CAP = 2048
