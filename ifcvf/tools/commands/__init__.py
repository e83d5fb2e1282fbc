"""One module per `ifcvf` sub-command; each exposes register(subparsers)."""
