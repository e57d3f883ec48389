"""Defences against critical-neuron collapse, each verified by re-running the attack (`verify`).

    rotate   - orthogonal rotation of the residual stream (function-preserving redundancy)
    split    - Net2WiderNet duplication of critical MLP units (function-preserving)
    finetune - targeted neuron dropout + KL to the frozen original (training-time hardening)
    pin      - runtime forward-hook guard holding critical neurons to their baseline profile
    repair   - restore tampered producing slices of a checkpoint from the fingerprint
    verify   - re-attack a hardened model with the same PCICN parameters; before/after verdict
"""
