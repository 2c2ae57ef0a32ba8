"""Queue and task names shared by the scheduler (which sends) and the workers (which consume)."""

IMAGE_QUEUE = "readar.images"
AGGREGATE_QUEUE = "readar.aggregate"
PROCESS_IMAGE = "readar.process_image"
AGGREGATE_CATEGORY = "readar.aggregate_category"


# Row ids are 32-bit integer columns: a larger id cannot name a row.
MAX_ID = 2**31 - 1


def _is_id(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_ID


def task_args_problem(task: str, args: object, kwargs: object) -> str | None:
    """Why a message's arguments cannot be one of READAR's tasks (None when they can). Checked before a message
    reaches Celery's request machinery, so a malformed message is dropped once instead of crashing a worker or
    entering the retry path."""
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "the body is not [args, kwargs, options]"
    if kwargs:
        return f"unexpected keyword arguments {sorted(map(str, kwargs))[:5]}"
    if task == PROCESS_IMAGE:
        if len(args) not in (2, 3) or not (_is_id(args[0]) and _is_id(args[1])):
            return f"expected [run id, image id, time sent] with ids from 1 to {MAX_ID}"
        if len(args) == 3 and args[2] is not None and type(args[2]) not in (int, float):
            return "the time sent is not a number"
        return None
    if task == AGGREGATE_CATEGORY:
        if len(args) != 2 or not _is_id(args[0]) or not isinstance(args[1], str) or not 0 < len(args[1]) <= 255:
            return f"expected [run id, category name] with a run id from 1 to {MAX_ID}"
        return None
    return None  # not one of ours: Celery's own handling (unknown task) applies
