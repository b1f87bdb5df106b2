"""Budgets of the separable pass: which layer gets which form and rank under a whole-model target.

``allocation`` (least error per MAC or parameter, :data:`BUDGET_DEFAULTS`), ``plan`` (a MAC or parameter budget
for the whole model: each conv's sizes, the model's MACs, one allocation), ``allotment`` (a uniform multiplier's
MACs per layer for other forms), ``latency`` (timing candidates on the device), ``latency_table`` (the on-disk
cache of those timings), ``latency_budget`` (``target_latency``: the layers, their errors and the result) and
``latency_search`` (its allocation on measured milliseconds, corrected by timing the whole model).
"""
