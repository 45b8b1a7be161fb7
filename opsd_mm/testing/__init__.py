"""Test harness shared by the tests and the benchmark scripts (not used by the product):
``server`` starts an ``opsd-mm serve`` subprocess on loopback; ``memory`` counts tensor bytes.
"""
