"""`scontrol show hostnames` for machines without SLURM (dry runs): expand 'gpu-[001-003,7],cpu1'."""

import re
import sys


def expand(nodelist: str) -> list[str]:
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts += [h for h in expand(f"{prefix}{n:0{len(lo)}d}{suffix}")]
    return hosts


if __name__ == "__main__":
    print("\n".join(expand(sys.argv[1])))
