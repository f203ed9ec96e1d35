"""One way to write a file: to a temporary name beside it, flushed to disk, then renamed over the real name.
A crash or an error mid-write never leaves a torn file under the real name (the last good checkpoint, model
or predictions file survives), and never a stray temporary one.

    with atomic_write("out/checkpoint.pt") as tmp:
        torch.save(state, tmp)
"""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path):
    """Yields the temporary path to write; on success it replaces `path`, on an exception it is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """A JSON file written atomically: a run killed mid-write leaves the old file or none, never half of one."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_text(path, text):
    """A UTF-8 text file written atomically, as write_json: the old file or the new one, never half of one."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def make_readable(path):
    """Give a written file the mode open() gives a new one: 0666 less the umask, usually 0644. safetensors
    always writes 0600, which a server running as another user (deploy/Dockerfile) could not read."""
    try:                                     # the umask without changing it (Linux); os.umask can only swap it
        with open("/proc/self/status") as f:
            mask = int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
