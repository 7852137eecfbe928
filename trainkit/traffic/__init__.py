"""Flow-split traffic planning for collectives, with a flow-level simulator.

Training traffic is a few large synchronised flows, the worst case for ECMP
hashing. This package plans where every byte goes on a leaf-spine fabric:
``split`` reaches the optimum ``max(host load, max_i out_i/(s c), max_j in_j/(s c))``
with few subflows, ``lp`` gives the fractional bound, ``ecmp``/``greedy`` are
the baselines, and the simulator turns any plan into completion times.
Pure numpy/scipy: importing it never imports torch.

Example::

    from trainkit.traffic import LeafSpine, collective, plan
    topo = LeafSpine(leaves=16, spines=16, hosts_per_leaf=16, nics_per_host=1,
                     host_gbps=400, uplink_gbps=400)
    flows = collective("allreduce_ring", hosts=list(range(256)), nbytes=256 << 20)
    p = plan(topo, flows, method="split")
    p.max_link_load, len(p.subflows)
"""

from trainkit.traffic.collectives import COLLECTIVES, DenseGroup, Flows, Phase, collective, combine, flows_from_pairs
from trainkit.traffic.errors import JobError, TopologyError, TrafficError, UnroutableError
from trainkit.traffic.hashing import HashModel
from trainkit.traffic.infer import Inference, InferredLink, infer_links
from trainkit.traffic.plan import Plan, Subflow
from trainkit.traffic.placement import Placement, PlacementError, load_placement
from trainkit.traffic.planners import PLANNERS, Planner, lower_bound, plan, planner_options, replan
from trainkit.traffic.topology import LeafSpine, LinkSpec, parse_link

__all__ = [
    "COLLECTIVES", "DenseGroup", "Flows", "HashModel", "Inference", "InferredLink", "JobError", "LeafSpine",
    "LinkSpec", "PLANNERS", "Phase", "Placement", "PlacementError", "Plan", "Planner", "Subflow", "TopologyError",
    "TrafficError", "UnroutableError", "collective", "combine", "flows_from_pairs", "infer_links", "load_placement",
    "lower_bound", "parse_link", "plan", "planner_options", "replan",
]
