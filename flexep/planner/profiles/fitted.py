"""Numbers fitted to DeepEP's published tables (V1 README, V2 README) by
:func:`flexep.planner.calibration.fit`. ``shared`` holds what every profile uses (achieved
fractions of line rate, an SM's copy rate); the other keys are per implementation.

Regenerate with ``flexep plan --calibrate --fit`` (it prints this file's contents).
"""

FIT = {
    'shared': {'scaleup_efficiency': 0.7125, 'rdma_efficiency': 0.8916, 'sm_copy_gbs': 28.38,
               'proxy_message_us': 1.0},
    'deepep_v1': {'sm_forward_gbs': 15.99, 'launch_us': 21.06, 'peer_us': 1.024, 'll_launch_us': 19.26,
                  'll_message_us': 0.01, 'll_token_us': 0.02001},
    'deepep_v2': {'launch_us': 19.04, 'peer_us': 0.5},
}
