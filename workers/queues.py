"""Queue and task names shared by the scheduler (which sends) and the workers (which consume)."""

IMAGE_QUEUE = "readar.images"
AGGREGATE_QUEUE = "readar.aggregate"
PROCESS_IMAGE = "readar.process_image"
AGGREGATE_CATEGORY = "readar.aggregate_category"
