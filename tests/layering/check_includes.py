#!/usr/bin/env python3
"""The dependency order of DESIGN.md section 1, enforced on every #include "..." under src/ and
kernels/: a file may include headers of its own folder and of the folders listed for it below,
nothing else of ours. Prints one line per violation (file:line: what and what is allowed) and
exits 1; exits 0 when the tree keeps the order.

    check_includes.py [ROOT]      ROOT: the repository root (default: two levels up)
"""
import pathlib
import re
import sys

# folder -> the folders of ours it may include (its own folder is always allowed).
# kernels and io are the bottom; app (the binary) is the top.
ALLOWED = {
    "kernels": set(),
    "io": set(),
    "quant": {"kernels", "io"},
    "lora": {"quant", "kernels", "io"},
    "model": {"lora", "quant", "kernels", "io"},
    "dist": {"quant", "kernels", "io"},
    "data": {"io"},
    "train": {"model", "dist", "data", "lora", "quant", "kernels", "io"},
    "app": {"train", "model", "dist", "data", "lora", "quant", "kernels", "io"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
SOURCES = (".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh")


def folder_of(root: pathlib.Path, path: pathlib.Path) -> str:
    rel = path.relative_to(root).parts
    return rel[0] if rel[0] == "kernels" else rel[1]


def layer_of_include(root: pathlib.Path, including: pathlib.Path, name: str):
    """The folder an include names, or None when it is not ours (a system or third-party header)."""
    first = name.split("/")[0]
    if "/" in name and first in ALLOWED and (root / "src" / name).exists():
        return first
    if (including.parent / name).exists():  # a header beside the file
        return folder_of(root, including.parent / name)
    if (root / "kernels" / name).exists():  # kernels/ is on the include path as a flat folder
        return "kernels"
    if "/" in name and first in ALLOWED:  # names a folder of ours but no such header
        return first
    return None


def violations(root: pathlib.Path):
    files = sorted(p for d in (root / "src", root / "kernels") if d.is_dir()
                   for p in d.rglob("*") if p.suffix in SOURCES)
    for path in files:
        here = folder_of(root, path)
        if here not in ALLOWED:
            yield f"{path.relative_to(root)}: folder '{here}' is not in the dependency order " \
                  f"(add it to tests/layering/check_includes.py and README 'Layout')"
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            m = INCLUDE.match(line)
            if not m:
                continue
            target = layer_of_include(root, path, m.group(1))
            if target is None or target == here or target in ALLOWED[here]:
                continue
            allowed = ", ".join(sorted(ALLOWED[here])) or "nothing of ours"
            yield (f"{path.relative_to(root)}:{lineno}: includes \"{m.group(1)}\" ({target}/), "
                   f"but {here}/ may use only {allowed}")


def main(argv):
    root = pathlib.Path(argv[1] if len(argv) > 1 else pathlib.Path(__file__).resolve().parents[2])
    bad = list(violations(root))
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} include(s) against the dependency order (README 'Layout')")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
