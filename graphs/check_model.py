#!/usr/bin/env python3
"""Run the full ONNX checker on each model file given on the command line.

    python3 graphs/check_model.py FILE.onnx [FILE.onnx ...]

The checker is called with the path (not a loaded proto), so models that keep
their weights as external data are checked too. Needs only the `onnx` package.
Prints one line per file and exits non-zero if any file fails.
"""
import sys

import onnx


def main(argv):
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    failed = 0
    for path in argv:
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as e:  # noqa: BLE001 - report every failure kind
            failed += 1
            msg = str(e).strip().splitlines()
            print(f"ERROR {path}: {type(e).__name__}: {msg[0] if msg else ''}")
            for line in msg[1:20]:
                print(f"    {line}")
        else:
            print(f"OK {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
