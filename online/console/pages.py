"""HTML for the console's pages: plain server-rendered markup, escaped in one place (`e`)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

from lake.config import EVENT_TYPES

NAV = (("/", "Home"), ("/models", "Model runs"), ("/experiments", "Experiments"),
       ("/live", "Live"))


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def link(kind: str, ident: str, text: str | None = None) -> str:
    return f'<a href="/{kind}/{quote(ident, safe="")}">{e(text or ident)}</a>'


def page(title: str, body: str, *, signed_in: bool, script: bool = False) -> str:
    """A whole page; signed out it has no navigation (there is nothing to reach)."""
    nav = " ".join(f'<a href="{href}">{e(text)}</a>' for href, text in NAV) if signed_in \
        else ""
    who = ('<span class="admin">admin</span> <form method="post" action="/logout" '
           'class="inline"><button>log out</button></form>' if signed_in else "")
    js = '<script src="/static/console.js" defer></script>' if script else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{e(title)} · lambdarec</title>'
            f'<link rel="stylesheet" href="/static/console.css">{js}</head>'
            f'<body><header><b>lambdarec</b> {nav}<span class="who">{who}</span></header>'
            f'<main><h1>{e(title)}</h1>{body}</main></body></html>')


def login(next_path: str, note: str = "") -> str:
    """The login form: the admin token (`server.admin_token`), then back to `next_path`."""
    return ((message(note, "bad") if note else "")
            + '<p>The console shows shoppers\' histories and can change the system: sign in '
              'with the admin token (server.admin_token).</p>'
            + '<form method="post" action="/login" id="login"><label>admin token '
              '<input type="password" name="token" autocomplete="current-password" required '
              'autofocus></label>'
            + f'<input type="hidden" name="next" value="{e(next_path)}">'
            + '<button>sign in</button></form>')


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, id: str = "") -> str:
    """Cells are already HTML (callers escape with `e` or build links)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    ident = f' id="{e(id)}"' if id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def message(text: str, kind: str = "note") -> str:
    return f'<p class="{e(kind)}" role="status">{e(text)}</p>'


def home(serving: str | None, examples: Sequence[str]) -> str:
    users = " ".join(link("users", u) for u in examples)
    return (f'<p>Serving model: <b id="serving">{e(serving or "none (popularity)")}</b></p>'
            '<form method="get" action="/users"><label>User <input name="id" required>'
            '</label><button>look up</button></form>'
            '<form method="get" action="/items"><label>Item <input name="id" required>'
            '</label><button>look up</button></form>'
            + (f'<p id="examples">Active users: {users}</p>' if examples else ""))


def _item_cells(it: dict[str, Any]) -> list[str]:
    return [link("items", it["item_id"]), e(it.get("title")), e(it.get("category"))]


def recommendations(reply: dict[str, Any]) -> str:
    strategy = str(reply.get("strategy", "")).removeprefix("STRATEGY_").lower()
    rows = []
    for it in reply.get("items", []):
        because = ", ".join(link("items", b["item_id"], b.get("title") or b["item_id"])
                            for b in it.get("because", []))
        rows.append([*_item_cells(it), f'{float(it.get("score", 0.0)):.3f}', because])
    return (f'<p>Strategy: <b class="strategy">{e(strategy)}</b> · model '
            f'{e(reply.get("model_version") or "none")}</p>'
            + table(["item", "title", "category", "score", "because you interacted with"],
                    rows, id="recommendations"))


def user(user_id: str, reply: dict[str, Any], events: list[dict[str, Any]], *,
         note: str = "") -> str:
    ev_rows = [[e(r["ts"].isoformat(timespec="seconds") if hasattr(r["ts"], "isoformat")
                  else r["ts"]), e(r["event_type"]), link("items", r["item_id"]),
                e(r.get("title")), e(r.get("category")), e(r["where"])] for r in events]
    options = "".join(f'<option{" selected" if t == "purchase" else ""}>{e(t)}</option>'
                      for t in EVENT_TYPES)
    first = reply.get("items", [{}])[0].get("item_id", "") if reply.get("items") else ""
    action = f"/users/{quote(user_id, safe='')}"
    ingest = (f'<form method="post" action="{action}/events" id="ingest"><label>item '
              f'<input name="item_id" value="{e(first)}" required></label> <label>type '
              f'<select name="event_type">{options}</select></label> '
              '<button>ingest test event</button></form>')
    forget = (f'<form method="post" action="{action}/forget" class="danger"><button>forget '
              'this user (erase everywhere)</button></form>')
    return ((message(note) if note else "") + "<h2>Recommendations</h2>"
            + recommendations(reply) + ingest + forget + "<h2>Recent events</h2>"
            + (table(["time", "type", "item", "title", "category", "source"], ev_rows,
                     id="events") if ev_rows else "<p id=\"events\">No events yet.</p>"))


def item(info: dict[str, Any], reply: dict[str, Any]) -> str:
    facts = table(["item", "title", "category", "price", "available"],
                  [[e(info["item_id"]), e(info.get("title")), e(info.get("category")),
                    e(info.get("price")), e(info.get("available"))]], id="item")
    rows = [[*_item_cells(it), f'{float(it.get("score", 0.0)):.3f}']
            for it in reply.get("items", [])]
    return facts + "<h2>Similar items</h2>" + table(["item", "title", "category", "score"],
                                                    rows, id="similar")


def _metric(m: dict[str, Any] | None, key: str, ci: dict[str, Any] | None = None) -> str:
    """`value [low, high]` (the bootstrap interval when the evaluation computed one)."""
    if not m or key not in m:
        return ""
    value = f"{float(m[key]):.4f}"
    interval = (ci or {}).get(key)
    if interval and len(interval) == 2:
        value += f" [{float(interval[0]):.4f}, {float(interval[1]):.4f}]"
    return e(value)


def _intervals(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    return (metrics.get("intervals") or {}).get("models", {}).get(name) or {}


def models(runs: list[dict[str, Any]], current: str | None, *, gate_metric: str,
           note: str = "") -> str:
    rows = []
    for r in runs:
        ms = r["metrics"].get("models", {})
        rows.append([link("models", r["model_version"]), e(r["status"]),
                     e(r["created_at"].isoformat(timespec="seconds")), e(r["backend"]),
                     _metric(ms.get("als"), gate_metric, _intervals(r["metrics"], "als")),
                     _metric(ms.get("popularity"), gate_metric,
                             _intervals(r["metrics"], "popularity")),
                     e(r.get("gate_reason"))])
    rollback = ""
    if runs:
        options = "".join(f"<option>{e(r['model_version'])}</option>" for r in runs
                          if r["status"] in ("published", "current"))
        rollback = ('<form method="post" action="/models/reload" class="inline"><button>'
                    'reload CURRENT on this server</button></form> <form method="post" '
                    'action="/models/rollback" class="inline"><select name="version">'
                    f'{options}</select><button>roll back to</button></form>')
    return ((message(note) if note else "")
            + f'<p>CURRENT: <b id="current">{e(current or "none")}</b></p>' + rollback
            + table(["version", "status", "created", "backend", gate_metric,
                     f"popularity {gate_metric}", "gate reason"], rows, id="runs"))


def model(run: dict[str, Any], trials: list[dict[str, Any]], plots: list[str],
          gate_metric: str) -> str:
    version = run["model_version"]
    accepted = run["status"] != "rejected"
    verdict = "ACCEPTED" if accepted else "REJECTED"
    gate = (f'<p id="gate" class="{"ok" if accepted else "bad"}">Gate: <b>{verdict}</b> '
            f'(status {e(run["status"])}): {e(run.get("gate_reason"))}</p>')
    ms = run["metrics"].get("models", {})
    keys = sorted({k for m in ms.values() if isinstance(m, dict) for k in m
                   if k.endswith(("@10", "@20"))})
    metric_rows = [[e(name), *(_metric(m, k, _intervals(run["metrics"], name)) for k in keys)]
                   for name, m in ms.items() if isinstance(m, dict)]
    trial_rows = [[e(t["model_version"].removeprefix(version)), e(t["backend"]),
                   e(", ".join(f"{k}={v}" for k, v in sorted(t["params"].items())
                               if not isinstance(v, dict))),
                   _metric(t["metrics"].get("validation"), gate_metric)]
                  for t in trials]
    imgs = "".join(f'<figure><img src="/reports/{quote(version)}/{quote(p)}" alt="{e(p)}">'
                   f"<figcaption>{e(p)}</figcaption></figure>" for p in plots)
    params = e(", ".join(f"{k}={v}" for k, v in sorted(run["params"].items())
                         if not isinstance(v, dict)))
    return (gate + f"<p>Backend {e(run['backend'])}, as of {e(run.get('as_of'))}; {params}</p>"
            + "<h2>Metrics (bootstrap intervals where computed)</h2>"
            + table(["model", *keys], metric_rows, id="metrics")
            + f"<h2>Tuning trials ({len(trials)})</h2>"
            + table(["trial", "backend", "params", f"validation {gate_metric}"], trial_rows,
                    id="trials")
            + f'<h2>Report plots</h2><div class="plots">{imgs or "none"}</div>')


def live() -> str:
    charts = "".join(f'<figure><canvas id="{c}" width="480" height="160"></canvas>'
                     f'<figcaption>{e(t)}: <b id="{c}-now">…</b></figcaption></figure>'
                     for c, t in (("rate", "requests / s"), ("latency", "mean latency ms"),
                                  ("lag", "ingest lag s (oldest unflushed event)")))
    return f'<div class="plots" id="live">{charts}</div>'


# -- experiments ---------------------------------------------------------------------------
def _arm_model(a: dict[str, Any]) -> str:
    if a.get("popularity"):
        return "popularity ranking"
    return e(a.get("model_version") or "champion (CURRENT)")


def _share(v: Any) -> str:
    return e(f"{100 * float(v or 0):.1f}%")


def experiments(rows: list[dict[str, Any]], note: str = "") -> str:
    """Every experiment, newest first (`python -m lake.experiments create` or the Admin
    API's CreateExperiment starts one)."""
    body = [[link("experiments", x["experiment_id"]), e(x.get("name")),
             f'<span class="{"ok" if x.get("state") == "running" else ""}">'
             f'{e(x.get("state"))}</span>',
             e(", ".join(f"{a['name']} {100 * float(a.get('share') or 0):.0f}%"
                         for a in x["arms"])),
             _share(x.get("traffic")), e(x.get("started_at")), e(x.get("stopped_at"))]
            for x in rows]
    return ((message(note) if note else "")
            + ("" if rows else "<p>No experiments yet: start one with <code>python -m "
                              "lake.experiments create</code> or the Admin API.</p>")
            + table(["experiment", "name", "state", "arms", "traffic", "started", "stopped"],
                    body, id="experiments"))


def experiment(x: dict[str, Any], results: list[dict[str, Any]], note: str = "") -> str:
    """One experiment: its arms and shares, its state, a stop button (confirmed on its own
    page) while it runs, and the analysis results (`ConsoleData.experiment_results`)."""
    ident = quote(x["experiment_id"], safe="")
    arms = [[e(a["name"]), _share(a.get("share")), _arm_model(a),
             e(", ".join(f"{k}={v}" for k, v in sorted((a.get("settings") or {}).items())))]
            for a in x["arms"]]
    stop = (f'<form method="post" action="/experiments/{ident}/stop" id="stop">'
            '<button>stop experiment…</button></form>' if x.get("state") == "running" else "")
    facts = (f'<p>{e(x.get("name"))}: <b id="state">{e(x.get("state"))}</b>, traffic '
             f'{_share(x.get("traffic"))} of all users, started {e(x.get("started_at"))}'
             + (f', stopped {e(x.get("stopped_at"))}' if x.get("stopped_at") else "")
             + f'; salt <code>{e(x.get("salt"))}</code></p>'
             + (f'<p>{e(x.get("description"))}</p>' if x.get("description") else ""))
    return ((message(note) if note else "") + facts + stop
            + "<h2>Arms</h2>" + table(["arm", "share", "model", "settings"], arms, id="arms")
            + "<h2>Results</h2>" + experiment_results(results))


def experiment_results(rows: list[dict[str, Any]]) -> str:
    """EXPERIMENT RESULTS (the attribution helper fills this in): the analysis rows as a
    plain table until then."""
    if not rows:
        return '<p id="results">No analysis yet (the experiment_results table has no rows ' \
               'for this experiment).</p>'
    keys = list(rows[0])
    return table(keys, [[e(r.get(k)) for k in keys] for r in rows], id="results")


def confirm_stop(x: dict[str, Any]) -> str:
    """The confirmation step of Stop: stopping ends the split for every replica."""
    ident = quote(x["experiment_id"], safe="")
    return (f'<p>Stop experiment <b>{e(x["experiment_id"])}</b> ({e(x.get("name"))})? Every '
            'replica then serves the champion to all users; the experiment is kept for its '
            'analysis and cannot be restarted.</p>'
            f'<form method="post" action="/experiments/{ident}/stop" id="confirm">'
            '<input type="hidden" name="confirm" value="yes"><button>yes, stop it</button>'
            f'</form> <a href="/experiments/{ident}">cancel</a>')
