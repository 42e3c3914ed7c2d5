"""compare_result_json.py A.json B.json RTOL: the numbers of two `entropy-probe run`
results agree (`timing` and `config` aside). A scalar within RTOL of the larger
magnitude of the pair; an array (s_values) within RTOL of its largest magnitude
in A, as the CUDA parity tests compare. Exit 0 if all agree, else 1 with the list."""
import json
import sys


def main():
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    rtol = float(sys.argv[3])
    bad, worst = [], [0.0, ""]

    def close(x, y, scale, where):
        err = abs(x - y) / scale if scale > 0 else abs(x - y)
        if err > worst[0]:
            worst[:] = [err, where]
        if err > rtol:
            bad.append(f"{where}: {x!r} vs {y!r} (relative error {err:.2e})")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def walk(x, y, where):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("timing", "config"):
                    continue
                if not isinstance(y, dict) or k not in y:
                    bad.append(f"{where}{k}: missing in {sys.argv[2]}")
                else:
                    walk(v, y[k], f"{where}{k}.")
        elif isinstance(x, list):
            if not isinstance(y, list) or len(x) != len(y):
                bad.append(f"{where}: lengths differ")
                return
            scale = max((abs(v) for v in x if number(v)), default=0.0)
            for i, (u, v) in enumerate(zip(x, y)):
                if number(u) and number(v):
                    close(u, v, scale, f"{where.rstrip('.')}[{i}]")
                else:
                    walk(u, v, f"{where.rstrip('.')}[{i}].")
        elif number(x) and number(y):
            close(x, y, max(abs(x), abs(y)), where.rstrip("."))
        elif x != y:
            bad.append(f"{where}: {x!r} vs {y!r}")

    walk(a, b, "")
    if bad:
        print("\n".join(bad))
        return 1
    print(f"all numbers within {rtol:g} relative (largest {worst[0]:.2e} at {worst[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
