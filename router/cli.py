"""`llm-router`: serve, migrate, import, train, replay."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from router.config import PREDICTOR_KINDS, ConfigError, RouterConfig, load_config


def _load(args: argparse.Namespace) -> RouterConfig:
    try:
        return load_config(args.config or os.environ.get("LLM_ROUTER_CONFIG"))
    except ConfigError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def launch_targets(config: RouterConfig) -> list:
    from backends.launcher import LaunchTarget

    return [
        LaunchTarget(
            name=b.name, base_url=b.base_url, served_model_name=b.model, kind=b.managed, model=b.launch_model,
            cpu_core=b.cpu_core, gpu_ids=tuple(b.gpu_ids), extra_args=tuple(b.extra_args),
        )
        for b in config.backends
        if b.managed
    ]


class _Interrupted(BaseException):
    """SIGINT or SIGTERM: the same orderly stop at every phase (start-up, serving, after uvicorn returns)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise _Interrupted(signum)


def serve(args: argparse.Namespace) -> int:
    """Managed backends start first (each under a guard that stops it if this process dies, however), then
    the service. SIGINT and SIGTERM stop both in order at every phase: during the backends' start-up
    they interrupt it, while serving uvicorn shuts down gracefully (and re-raises the signal, which lands
    here). Either way the managed backends are stopped before exit (status 0)."""
    import signal

    from backends.launcher import BackendLauncher, LaunchError, port_in_use
    from router.api.auth import Authenticator

    config = _load(args)
    host = args.host or config.server.host
    port = args.port or config.server.port
    try:
        authenticator = Authenticator(config.auth, host, os.environ)
        for backend in config.backends:  # each api_key_env must be set before anything starts
            backend.request_headers(os.environ)
    except ConfigError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    if port_in_use(host, port):
        print(f"llm-router: port {port} on {host} is already in use (server.port, --port); stop what listens there or choose "
              "another port", file=sys.stderr)
        return 1
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled}
    launcher = BackendLauncher(launch_targets(config), Path(config.log_dir))
    try:
        if launcher.targets:
            print(f"llm-router: starting {len(launcher.targets)} managed backends ...", file=sys.stderr, flush=True)
            launcher.start()
            launcher.wait_ready()
            launcher.supervise()
        import uvicorn

        from router.api import create_app
        from router.service import RouterService

        if config.cluster.enabled and not config.cluster.replica_id:  # a stable name, so a restart finds what it left
            import socket

            config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"replica_id": f"{socket.gethostname()}:{port}"})})
        service = RouterService(config)
        service.pool.launcher = launcher if launcher.targets else None
        print(f"llm-router: serving on http://{host}:{port} (policy {config.default_policy})", file=sys.stderr, flush=True)
        # Keep-alive longer than clients' idle-connection expiry (httpx 5 s, aiohttp 15 s): a server closing a
        # connection at the moment a client reuses it makes that request fail (seen in bench/overhead.py).
        uvicorn.run(create_app(service, authenticator), host=host, port=port, timeout_keep_alive=75,
                    log_level=os.environ.get("LLM_ROUTER_LOG_LEVEL", "INFO").lower(), access_log=config.server.access_log)
    except _Interrupted as stop:
        print(f"llm-router: {signal.Signals(stop.signum).name}: stopping", file=sys.stderr, flush=True)
    except LaunchError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in handled:  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            if launcher.pids():
                print("llm-router: stopping managed backends ...", file=sys.stderr, flush=True)
            launcher.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def config_check_command(args: argparse.Namespace) -> int:
    """Validate a config file as `serve` would (fields, environment overrides, keys, backends' api_key_env,
    managed backends' command lines) without starting anything: exit 0 and a summary, or 2 and what is wrong."""
    from sqlalchemy.engine import make_url

    from backends.launcher import LaunchError, build_command
    from router.api.auth import Authenticator
    from router.db import normalise_url

    try:
        config = load_config(args.file)
        Authenticator(config.auth, config.server.host, os.environ)
        for backend in config.backends:
            backend.request_headers(os.environ)
        for target in launch_targets(config):
            build_command(target)
    except (ConfigError, LaunchError) as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    try:
        database = make_url(normalise_url(config.database_url)).get_backend_name()
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's ArgumentError and friends: the URL cannot be used
        print(f"llm-router: config file {args.file}: database_url (or DATABASE_URL): {exc}", file=sys.stderr)
        return 2
    managed = [b.name for b in config.backends if b.managed]
    print(f"config file {args.file}: ok: {len(config.backends)} backends ({', '.join(b.name for b in config.backends)}"
          f"{'; managed: ' + ', '.join(managed) if managed else ''}), policy {config.default_policy}, "
          f"listens on {config.server.host}:{config.server.port}, database {database}")
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    from router.db import create_db_engine, migrate

    config = _load(args)
    engine = create_db_engine(config.database_url)
    migrate(engine)
    print(f"llm-router: database at head ({engine.url.render_as_string(hide_password=True)})")
    return 0


def import_command(args: argparse.Namespace) -> int:
    import json

    from router.db import create_db_engine, migrate
    from router.history import HistoryFileError, import_file

    config = _load(args)
    try:
        rename = dict(pair.split("=", 1) for pair in args.rename)
    except ValueError:
        print("llm-router: --as takes MODEL=BACKEND", file=sys.stderr)
        return 2
    db = create_db_engine(config.database_url)
    try:
        if config.auto_migrate:
            migrate(db)
        counts = import_file(db, args.file, rename)
    except (HistoryFileError, OSError) as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    finally:
        db.dispose()
    backends = {b.name for b in config.backends}
    print(json.dumps({"file": args.file, **counts, "backends_configured": sorted(backends)}))
    return 0


def train_command(args: argparse.Namespace) -> int:
    import json

    from router.db import create_db_engine, migrate
    from router.training import run_training

    config = _load(args)
    if config.auto_migrate:
        db = create_db_engine(config.database_url)
        migrate(db)
        db.dispose()
    runs = run_training(config, "cli")
    print(json.dumps(runs, indent=2))
    return 1 if any(run["status"] == "failed" for run in runs) else 0


def replay_command(args: argparse.Namespace) -> int:
    import json

    from policies import PREDICTED_POLICIES
    from router.embedding import build_embedder
    from router.progress import showing
    from router.replay import DatasetError, TrainFraction, comparison_table, run, select_policies

    config = _load(args)
    with_history = args.train_fraction is not None
    if args.warm_start and not with_history:
        print("llm-router: --warm-start needs --train-fraction (its history part is what the bandits warm-start from)", file=sys.stderr)
        return 2
    if args.mode != "route" and (args.peers or args.shadows):
        print(f"llm-router: --mode {args.mode} does not combine with --peers or --shadows", file=sys.stderr)
        return 2
    if args.k is not None and (args.mode != "parallel" or args.k < 2):
        print("llm-router: --k (at least 2) goes with --mode parallel", file=sys.stderr)
        return 2
    if args.mode == "cascade" and config.modes.cascade_judge == "verify":
        print("llm-router: a cascade judged by verification (modes.cascade_judge = \"verify\") asks the backends new "
              "questions, which recorded answers cannot replay; measure it on real backends (bench/modes.py)", file=sys.stderr)
        return 2
    if args.mode == "cascade" and not with_history:
        print("llm-router: --mode cascade needs --train-fraction: its order and its scorer come from the history part", file=sys.stderr)
        return 2
    if args.policy is None and args.mode != "cascade":
        print("llm-router: --policy is required (a cascade needs none: its order comes from the history)", file=sys.stderr)
        return 2
    try:
        policies, skipped = select_policies(args.policy, with_history) if args.mode != "cascade" else ([], [])
    except ValueError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    if skipped:
        print(f"llm-router: skipped {', '.join(skipped)}: predictor policies need --train-fraction "
              "(without trained predictors they only run their fallback)", file=sys.stderr)
    fallback_only = [p for p in policies if p in PREDICTED_POLICIES and not with_history]
    if fallback_only:
        print(f"llm-router: without --train-fraction, {', '.join(fallback_only)} only run their fallback policy", file=sys.stderr)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"llm-router: --seeds must be integers separated by commas, got {args.seeds!r}", file=sys.stderr)
        return 2
    if args.budget is not None and args.budget < 0:
        print("llm-router: --budget must not be negative", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    train = None
    if with_history:
        from router.training import train_settings

        if args.warm_start and args.mode != "route":
            print("llm-router: --warm-start goes with --mode route", file=sys.stderr)
            return 2
        if not 0 < args.train_fraction < 1:
            print("llm-router: --train-fraction must be between 0 and 1", file=sys.stderr)
            return 2
        if args.peers:
            print("llm-router: --train-fraction does not combine with --peers", file=sys.stderr)
            return 2
        settings = train_settings(config).model_copy(update={"threads": os.cpu_count() or 1})
        train = TrainFraction(args.train_fraction, settings)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()] if args.budgets else None
        with showing():  # progress bars on stderr, when it is a terminal
            reports = run(args.data, policies, seeds, args.budget, Path(args.out), build_embedder(config.embedder),
                          models=models, config=config, budgets=budgets, peers=args.peers, train=train, shadows=args.shadows,
                          mode=args.mode, k=args.k, warm_start=args.warm_start)
    except (DatasetError, OSError, ValueError) as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    if len(reports) == 1 and not sys.stdout.isatty():  # a script reads the report (DESIGN: one JSON object)
        print(json.dumps(reports[0], indent=2))
        return 0
    print(comparison_table(reports))
    print(f"reports (report.json) and plots (*.png) in {args.out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llm_router").setLevel(os.environ.get("LLM_ROUTER_LOG_LEVEL", "INFO").upper())
    parser = argparse.ArgumentParser(prog="llm-router", description="Online-learning router for LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the service (and the backends it manages)")
    serve_parser.add_argument("--config", help="TOML config file (default: embedded defaults)")
    serve_parser.add_argument("--host")
    serve_parser.add_argument("--port", type=int)
    serve_parser.set_defaults(run=serve)
    config_parser = commands.add_parser("config", help="configuration tools")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True)
    check_parser = config_commands.add_parser("check", help="validate a config file without starting anything (exit 0, or 2 and why)")
    check_parser.add_argument("file", help="TOML config file")
    check_parser.set_defaults(run=config_check_command)
    migrate_parser = commands.add_parser("migrate", help="upgrade the database schema to head")
    migrate_parser.add_argument("--config")
    migrate_parser.set_defaults(run=migrate_command)
    import_parser = commands.add_parser("import", help="load a file of recorded outcomes as history for the predictors and the policies' warm starts")
    import_parser.add_argument("file", help="JSONL in the shared data format (every model's outcome per prompt)")
    import_parser.add_argument("--as", dest="rename", action="append", default=[], metavar="MODEL=BACKEND",
                               help="store MODEL's outcomes under BACKEND (repeatable)")
    import_parser.add_argument("--config")
    import_parser.set_defaults(run=import_command)
    train_parser = commands.add_parser("train", help=f"train the predictors once ({', '.join(PREDICTOR_KINDS)}; mf while the mf "
                                                     "policy runs) and promote each that validates no worse than the model in use")
    train_parser.add_argument("--config")
    train_parser.set_defaults(run=train_command)
    replay_parser = commands.add_parser("replay", help="replay recorded outcomes through the routing engine")
    replay_parser.add_argument("--data", required=True, help="routing file in the shared data format (*.jsonl)")
    replay_parser.add_argument("--policy", default=None,
                               help="policy name, comma-separated names, or 'all' (forc, hybrid and mf only with --train-fraction)")
    replay_parser.add_argument("--seeds", default="0", help="comma-separated seeds, one online pass each")
    replay_parser.add_argument("--budget", type=float, default=None,
                               help="target mean cost per query in USD (replaces the config's [budget] target)")
    replay_parser.add_argument("--models", default=None, help="comma-separated subset of the file's models")
    replay_parser.add_argument("--out", default="var/replay", help="directory for report.json")
    replay_parser.add_argument("--budgets", default=None, help="comma-separated budget sweep (USD per query): AIQ, plots")
    replay_parser.add_argument("--peers", action="store_true", help="add MABWiser and river rows on the same stream")
    replay_parser.add_argument("--shadows", action="store_true",
                               help="also run the config's other policies as shadows, as the service does (in decision times)")
    replay_parser.add_argument("--train-fraction", type=float, default=None,
                               help="history share of each shuffled stream: predictors train on it, the rest is routed")
    replay_parser.add_argument("--warm-start", action="store_true",
                               help="with --train-fraction: the bandits warm-start from the history part (every model's outcome, "
                                    "as imported history) instead of learning it online with bandit feedback")
    replay_parser.add_argument("--mode", choices=("route", "cascade", "parallel"), default="route",
                               help="route: one call per prompt; cascade/parallel: answer-aware modes from the answers file "
                                    "beside the routing file (X_routing.jsonl -> X_answers.jsonl), every call paid; "
                                    "with --train-fraction the answer scorer trains on the history part")
    replay_parser.add_argument("--k", type=int, default=None, help="backends called per prompt in --mode parallel (default: [modes] parallel_k)")
    replay_parser.add_argument("--config", help="config file: [budget], embedder, neighbours, policies, policy options, [predictors]")
    replay_parser.set_defaults(run=replay_command)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
