"""Command-line front end: one module per command group; thin: parse, call, print.

Each module exposes add_parser(subparsers) and keeps its top-level imports light
(argparse only) so `fcvm --help` and `fcvm ls` start fast; the work is imported
inside the command function.
"""
