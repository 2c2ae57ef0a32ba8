"""Everything that turns one test image into logits: detectors, preprocessing, batching, the task function."""
