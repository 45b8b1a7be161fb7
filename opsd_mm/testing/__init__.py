"""Test harness shared by the tests and the benchmark scripts (not used by the product):
``server`` starts an ``opsd-mm serve`` subprocess on loopback; ``memory`` counts tensor bytes;
``greedy`` compares greedy completions from two engines up to near ties.
"""
