"""meshserve: PaLM-style decoder inference on device meshes (Pope et al., MLSys 2023).

The code lives in the top-level folders partition/, model/, analytics/ and serving/, installed as
`meshserve.partition`, `meshserve.model`, `meshserve.analytics` and `meshserve.serving`.
"""

__version__ = "0.1.0"
