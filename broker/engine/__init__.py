"""The pipeline: intake, batching, per-key pacing and budgets, adaptive backoff, retries, dispatch.

Each stage is its own module; the per-key rate-control primitives are ``limiter`` (pacer and
the ``KeyLimiter`` seam), ``adaptive`` (target-loss AIMD, 429 classification, circuit),
``quota`` (daily budget) and ``retry`` (retry policy and budget).
"""
