"""The daemon side: job files in, one result row per input row out, resumable after a crash.

``sources`` reads job files (txt, CSV, JSON Lines, optionally gzipped) into rows with their
line numbers; the ledger, sinks, runner and spool daemon build on it.
"""
