"""The module's self-test scenario, free of Qt: run by ``MicroCTSynthTest`` in Slicer and by pytest."""
