"""Whole-model integrity: one door per weight format, tensor records, and their verification.

Torch-free on purpose: a full `guard verify-checkpoint` of an untouched checkpoint parses JSON
headers and hashes bytes, nothing more (docs/fingerprint.md).

    formats  open_source(path): a safetensors directory (loader precedence) or a GGUF file, as
             TensorEntry records with their raw bytes and their values row by row
    records  TensorRecords: every loaded tensor's name, dtype, shape, sha256 and row sketch;
             build_records(source, ...) at scan time, check_tensors(source, records) at verify time
    fpfile   the fingerprint's safetensors container read without torch, and its HMAC
"""
