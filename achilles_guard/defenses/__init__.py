"""Defences against critical-neuron collapse, each behind one interface (base.py) and each verified by
re-attacking with the whole attack portfolio (`reattack`).

    pin        - runtime guard: restores always-on and first-position (attention-sink) values (monitor --protect)
    redundancy - carry each critical residual channel on k channels and split the units that write it
    heads      - Net2WiderNet over attention heads: k copies of every head holding a fingerprinted q/k/v channel
    split      - Net2WiderNet duplication of critical MLP units (function-preserving)
    rotate     - orthogonal rotation of the residual stream (function-preserving redundancy)
    finetune   - neuron dropout over every attack's set + KL to the frozen original (training-time hardening)
    harden     - apply each step -> re-attack -> margin and verdict (strategies, chains, auto)
    reattack   - re-run the scan and the portfolio on a hardened model; margin, Δ with n0 neurons, clean cost
    repair     - restore tampered producing slices of a checkpoint from the fingerprint
"""
