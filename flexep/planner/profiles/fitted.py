"""Numbers fitted to DeepEP's published tables (V1 README, V2 README) by
:func:`flexep.planner.calibration.fit`. ``shared`` holds what every profile uses (achieved
fractions of line rate, an SM's copy rate); the other keys are per implementation.

Regenerate with ``flexep plan --calibrate --fit`` (it prints this file's contents).
"""

FIT = {
    'shared': {'scaleup_efficiency': 0.7231, 'rdma_efficiency': 0.9134, 'sm_copy_gbs': 28.43},
    'deepep_v1': {'sm_forward_gbs': 16.02, 'launch_us': 20.23, 'peer_us': 1.003, 'll_launch_us': 23.51,
                  'll_message_us': 0.009998, 'll_token_us': 0.02},
    'deepep_v2': {'launch_us': 19.37, 'peer_us': 0.5},
}
