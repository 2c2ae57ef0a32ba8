"""PixelLM (LLaVA + a [SEG] codebook + a light multi-scale mask decoder over CLIP features, no SAM image encoder)
inference, reproducing PixelLM's ``evaluate``: ``config`` (the released config and forced settings),
``modules`` (prompt encoder and multi-scale mask decoder, released names), ``model`` (CLIP resized to 448, the
projectors, neck and heads), ``loader``, ``decode`` (greedy generation, the states before each [SEGk]), ``tiny``
(random-weight folders in the released layouts) and ``detector`` (the ``pixellm`` detector)."""
