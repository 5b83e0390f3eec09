"""Everything that knows Amazon's wire formats: request bodies, responses, signing and tokens.

The engine talks to this package through :mod:`broker.api.base` only, so when Amazon
changes its API the engine does not change.
"""
