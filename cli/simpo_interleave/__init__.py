"""The `simpo-interleave` command line: the local runner (a SimpoInterleaveJob as local host processes), the demo, and the dispatch to the worker, renderer and operator."""
