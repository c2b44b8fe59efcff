"""Triton kernels, installed as janus_fast.kernels: one module per op family.

Each launcher has the signature and return convention of the reference function of the same
name in janus_fast/ops/reference.py; janus_fast.ops validates inputs before calling them.
"""
