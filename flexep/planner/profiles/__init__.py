"""Implementation profiles, one module per implementation, each defining ``PROFILE``.

``fitted`` holds the numbers the calibration fitted to DeepEP's published tables
(``flexep plan --calibrate --fit`` prints a new version of it); the profile modules combine
them with each implementation's structure.
"""
