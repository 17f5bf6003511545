"""The netbed hardware preset and the flexep-over-Gloo profile: what they describe, and that the
planner's predictions for them respect the link limit and the paths (checked independently)."""

import math

from flexep.planner.ecmp import leaf_of
from flexep.planner.hardware import Hardware
from flexep.planner.plan import predict
from flexep.planner.presets import get_preset
from flexep.planner.presets.netbed import netbed_preset
from flexep.planner.profile import get_profile
from flexep.planner.routing import Routing
from flexep.planner.workload import ModelShape
from flexep.topology import Topology


def test_netbed_preset_describes_the_testbed():
    hw = get_preset("netbed")
    assert hw == Hardware.from_dict(netbed_preset(0.25, 2, 2))
    assert hw.gpus_per_node == 2 and hw.scale_up.domain_size == 2
    # A node's 2 x 0.25 Gbit/s is shared by its 2 ranks: 31.25 MB/s each.
    assert math.isclose(hw.nic.line_gbs, 0.25 * 2 / 2 / 8)
    assert (hw.nic.initiator, hw.fabric.routing, hw.fabric.uplinks_per_leaf) == ("host", "ecmp", 2)
    # One leaf per node: the node's planes are its uplinks.
    assert leaf_of(Topology(4, 2), hw.fabric).tolist() == [0, 0, 1, 1]
    one = Hardware.from_dict(netbed_preset(1.0, 1, 1))
    assert leaf_of(Topology(4, 1), one.fabric).tolist() == [0, 1, 2, 3]
    assert math.isclose(one.nic.line_gbs, 1.0 / 8)
    prof = get_profile("flexep_gloo")
    assert prof.family == "flexep" and not prof.calibrated and prof.qps_per_peer == 1


def _total(preds, channels):
    return sum(p.time_us for p in preds if p.channels == channels)


def test_predictions_respect_the_node_link_and_the_paths():
    shape = ModelShape(tokens_per_rank=256, dispatch_dtype="bf16")
    hw1 = Hardware.from_dict(netbed_preset(0.25, 1, 2))
    hw2 = Hardware.from_dict(netbed_preset(0.25, 2, 2))
    p1 = predict(hw1, shape, Routing("uniform"), 4, modes=("hierarchical",), channels=(1, 4),
                 profile="flexep_gloo")
    p2 = predict(hw2, shape, Routing("uniform"), 4, modes=("hierarchical",), channels=(1, 4),
                 profile="flexep_gloo")
    # Floor by hand: a node's 512 tokens each need the other node unless all 8 experts are local
    # (probability C(128, 8) / C(256, 8)); one 7168 x 2-byte row each way, at 0.25 Gbit/s.
    rows = 512 * (1 - math.comb(128, 8) / math.comb(256, 8))
    floor_us = 2 * rows * 7168 * 2 / (0.25e9 / 8) * 1e6
    assert _total(p1, 1) > floor_us
    assert _total(p2, 4) > floor_us / 2
    # Two paths help; with two paths, four flows per peer spread better than one.
    assert _total(p2, 4) < _total(p1, 4)
    assert _total(p2, 4) <= _total(p2, 1)
