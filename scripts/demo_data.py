#!/usr/bin/env python3
"""The demo's instruction dataset, from text this machine has and nobody here wrote: the NAME line
of each section-1 man page ("ls \\- list directory contents") becomes an alpaca row

    {"instruction": "What does the `ls` command do?", "input": "", "output": "`ls`: list directory contents."}

Writes OUT_DIR/train.jsonl (every command but the held-back ones) and OUT_DIR/prompts.jsonl
(the held-back commands' questions, for `qlora_dist generate --prompts`). Deterministic: the man
pages are read in sorted order. Standard library only.

    python3 scripts/demo_data.py OUT_DIR [--max-rows 1200] [--hold-back cp,grep,tar,sed,...]
"""
import argparse
import gzip
import json
import os
import re
import sys

MAN1 = "/usr/share/man/man1"


def name_line(path):
    """(names, description) of a man page's NAME section, or None."""
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read(20000)
    except (OSError, EOFError):
        return None
    m = re.search(r'^\.SH "?NAME"?\s*\n(?:\.[A-Za-z].*\n)*(.+?)\n', text, re.M)
    if not m:
        return None
    line = m.group(1)
    parts = re.split(r"\s+\\\(?[-em]{1,2}\)?\s+|\s+\\-\s*", line, maxsplit=1)
    if len(parts) != 2:
        return None
    names = [n.strip().strip(",").replace("\\-", "-") for n in parts[0].split(",")]
    desc = re.sub(r"\\f[BIRP]|\\\(..|\\", "", parts[1]).strip().rstrip(".")
    return names, desc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--max-rows", type=int, default=1200)
    ap.add_argument("--hold-back", default="cp,grep,tar,sed,chmod,gzip")
    args = ap.parse_args()
    hold = args.hold_back.split(",")
    rows, held, seen = [], {}, set()
    for fname in sorted(os.listdir(MAN1)):
        if not fname.endswith(".1.gz"):
            continue
        got = name_line(os.path.join(MAN1, fname))
        if not got:
            continue
        names, desc = got
        cmd = names[0]
        if (not re.fullmatch(r"[a-z][a-z0-9_.+-]{1,24}", cmd) or cmd in seen
                or not 8 <= len(desc) <= 90 or not desc.isascii()
                or re.search(r"manual page|\s(the|a|an|of|into|to|for|and|with|from)$", desc, re.I)):
            continue
        seen.add(cmd)
        row = {"instruction": f"What does the `{cmd}` command do?", "input": "",
               "output": f"`{cmd}`: {desc}."}
        if cmd in hold:
            held[cmd] = row
        elif len(rows) < args.max_rows:
            rows.append(row)
    missing = [c for c in hold if c not in held]
    if missing:
        sys.exit(f"demo_data: no man page NAME line for {', '.join(missing)} in {MAN1}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out_dir, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": held[c]["instruction"], "reference": held[c]["output"]}) + "\n"
                     for c in hold)
    print(f"demo data: {len(rows)} rows from {MAN1} NAME lines, {len(hold)} held back "
          f"({', '.join(hold)})")


if __name__ == "__main__":
    main()
