"""``h800_roce`` with top-of-rack cabling: a node's eight NICs share a leaf with three other
nodes' (32 ports per leaf), so rail-aligned traffic between nodes on different leaves crosses
the spine, where ECMP hashes each queue pair onto one path.
"""

from .h800_roce import PRESET as _ROCE

PRESET = {
    **_ROCE,
    "name": "h800_roce_tor",
    "description": "8x H800 per node, NVLink 200 GB/s/dir, 1x CX7 400 GbE RoCE per GPU, "
                   "top-of-rack leaves (4 nodes per leaf), ECMP",
    "fabric": {**_ROCE["fabric"], "rail_optimized": False},
}
