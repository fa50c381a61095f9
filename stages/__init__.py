"""One module per DVC stage; each has `run(...)` returning its metrics and `main(argv=None)`."""
