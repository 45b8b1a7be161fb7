"""One module per benchmark, looked up by name through ``opsd_mm.eval.registry``."""
