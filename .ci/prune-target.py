#!/usr/bin/env python3
"""Deletes test and bench executables of the build cache that a newer build of the same target replaced.

cargo keeps every hashed executable it ever linked in <target>/<profile>/deps (one per feature/source change);
over a day of work the cache reached 50 GB and filled the disk. Libraries are kept: cargo reuses them.
"""
import os
import re
import sys
from collections import defaultdict

target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARGO_TARGET_DIR", "target")
freed = 0
for profile in ("debug", "release"):
    deps = os.path.join(target, profile, "deps")
    if not os.path.isdir(deps):
        continue
    groups = defaultdict(list)
    for name in os.listdir(deps):
        path = os.path.join(deps, name)
        m = re.fullmatch(r"(.+)-[0-9a-f]{16}", name)  # executables have no extension
        if m and not name.startswith("lib") and os.path.isfile(path):
            groups[m.group(1)].append((os.path.getmtime(path), path))
    for versions in groups.values():
        for _, path in sorted(versions)[:-1]:
            freed += os.path.getsize(path)
            os.remove(path)
print(f"prune-target: freed {freed / 1e9:.1f} GB of superseded executables in {target}")
