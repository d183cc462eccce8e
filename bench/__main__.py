"""Run benchmark cases, print one table each, and save the results with the machine's details."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from importlib import import_module, metadata
from pathlib import Path

CASES = ["arrange", "ack", "start", "fanout", "idle", "throughput"]


def machine() -> dict[str, object]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = line.split(":")[1].strip()
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory": mem,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: version(p) for p in ("aiohttp", "redis", "asyncpg", "orjson", "openai")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (well under 2 minutes)")
    args = parser.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(
            f"unknown case(s): {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}"
        )
    args.cases = args.cases or CASES
    results: dict[str, object] = {"machine": machine(), "quick": args.quick}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = Path(__file__).parent / "results" / f"{stamp}.json"
    failed = []
    for case in args.cases:
        module = import_module(f"bench.{case}")
        try:
            result = module.run(quick=args.quick)
        except Exception as err:  # noqa: BLE001 - one broken case must not lose the others
            results[case] = {"error": repr(err)}
            failed.append(case)
            print(f"\n## {case}\n\nFAILED: {err!r}", flush=True)
        else:
            results[case] = result
            print(f"\n## {case}\n\n{module.table(result)}", flush=True)
        out.write_text(json.dumps(results, indent=2))  # after every case
    print(f"\nsaved {out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
