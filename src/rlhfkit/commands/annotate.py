"""``rlhfkit annotate``: the human annotation app.

  rlhfkit annotate import --db FILE --data FILE
  rlhfkit annotate add-annotator --db FILE --name NAME [--items N | --overlap] [--data FILE]
  rlhfkit annotate serve --db FILE [--data FILE] [--host 127.0.0.1] [--port 8080]
  rlhfkit annotate export --db FILE --out FILE

Data records: ``{"prompt": str, "responses": [str, ...]}`` (2-9 responses). Importing is
idempotent: an item already in the store is not added twice.
"""
from __future__ import annotations

import sys
from pathlib import Path

from rlhfkit.annotate.export import agreement_path, export, format_agreement
from rlhfkit.annotate.server import make_server
from rlhfkit.annotate.store import Store, StoreError
from rlhfkit.config import ConfigError
from rlhfkit.serve_http import serve_until_interrupted


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="annotate_command", metavar="ACTION", required=True)
    s = sub.add_parser("import", help="add the items of a data file to the store")
    s.add_argument("--db", required=True)
    s.add_argument("--data", required=True)
    s = sub.add_parser("add-annotator", help="create an annotator, assign items, print their token")
    s.add_argument("--db", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--data", help="import this data file first")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--items", type=int, help="assign the N items with the fewest annotators so far")
    g.add_argument("--overlap", action="store_true", help="assign every item (the default)")
    s = sub.add_parser("serve", help="start the web app")
    s.add_argument("--db", required=True)
    s.add_argument("--data", help="import this data file first")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a connection may wait for the next bytes of its request before it is closed")
    s.add_argument("--max-connections", type=int, default=64,
                   help="connections served at once; past it the longest-waiting idle one is closed, or 503")
    s = sub.add_parser("export", help="write the rankings and inter-annotator agreement")
    s.add_argument("--db", required=True)
    s.add_argument("--out", required=True, help="rankings JSONL; agreement goes to <name>.agreement.json beside it")


def _import(store, data) -> None:
    added, present = store.import_items(data)
    print(f"imported {added} items from {data} ({present} already present)", file=sys.stderr)


def run(args) -> int:
    action = args.annotate_command
    creates = action in ("serve", "import") or getattr(args, "data", None)
    if not creates and not Path(args.db).exists():
        raise ConfigError(f"{args.db}: no such annotation database")
    store = Store(args.db)
    try:
        if action == "import":
            _import(store, args.data)
        elif action == "add-annotator":
            if args.data:
                _import(store, args.data)
            token = store.add_annotator(args.name, args.items)
            n = len(store.queue(store.annotator_for_token(token)[0]))
            print(f"annotator {args.name!r}: {n} items assigned; give them this token (it is not stored):",
                  file=sys.stderr)
            print(token)
        elif action == "serve":
            if args.data:
                _import(store, args.data)
            server = make_server(store, args.host, args.port, read_timeout_s=args.read_timeout,
                                 max_connections=args.max_connections)
            host, port = server.server_address[:2]

            serve_until_interrupted(server, f"annotation app at http://{host}:{port}/ (Ctrl-C to stop)")
        elif action == "export":
            records, agreement = export(store, args.out)
            print(f"wrote {len(records)} rankings to {args.out}; agreement in {agreement_path(args.out)}")
            print(format_agreement(agreement))
    except StoreError as e:
        raise ConfigError(str(e)) from None
    return 0
