"""Turn chat logs people have into the replay format (:mod:`drivers.replay`).

Three sources, each read into :class:`~drivers.replay.CorpusMessage` values (``ts`` in seconds since
the epoch here, ``room``, ``sender``, ``text``), then :func:`write_replay` writes the gzip JSON Lines
file that ``im-actors demo --corpus`` and ``drivers.run replay --corpus`` read:

- :func:`read_slack_export`: a Slack workspace export (the folder, or its ``.zip``): one folder per
  channel holding ``YYYY-MM-DD.json`` files, each a list of message objects ``{"type": "message",
  "user", "text", "ts": "<seconds>.<micro>"}``. Join/leave/topic and other events (a ``subtype``
  other than ``thread_broadcast``, ``me_message``, ``file_share``) and bot messages are left out.
- :func:`read_irc_log`: plain IRC logs of irssi (``--- Log opened Mon Jan 04 14:14:05 2016``,
  ``--- Day changed Tue Jan 05 2016``, then ``HH:MM[:SS] <nick> text`` and ``HH:MM * nick action``)
  or weechat (``YYYY-MM-DD HH:MM:SS<TAB>nick<TAB>text``, where the nick column ``-->``, ``<--``, ``--``
  and ``=!=`` marks events and `` *`` an action); nick mode prefixes ``@ + % ~ &`` are dropped.
  One room per file (``room``, default the file name).
- :func:`read_csv`: a CSV file with a header naming at least ``ts``, ``room``, ``sender``, ``text``
  (``ts`` as seconds since the epoch or ISO 8601).

:func:`write_replay` sorts by time (stable: log order kept for equal times), shifts the times to start
at 0, and renames senders ``u1, u2, ...`` and rooms ``r1, r2, ...`` by first appearance, as the shipped
corpus does (the names of a log are rarely valid user ids, and a replay needs none of them). IRC
``/me`` actions are written ``"/me ..."``.

Command line: ``python -m drivers.importers slack EXPORT OUT.jsonl.gz``, ``... irc LOG... OUT`` (one room
per file), ``... csv FILE OUT``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from drivers.replay import CorpusMessage

__all__ = ["read_slack_export", "read_irc_log", "read_csv", "write_replay", "main"]

_SLACK_KEPT_SUBTYPES = {None, "thread_broadcast", "me_message", "file_share"}
_NICK_MODES = "@+%~&"


def read_slack_export(path: str | Path) -> list[CorpusMessage]:
    """The messages of a Slack export folder or ``.zip`` (see the module docstring), in time order.

    Raises ValueError when no channel file is found.
    """
    path = Path(path)
    files: list[tuple[str, str]] = []  # (channel, json text)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                parts = Path(name).parts
                if len(parts) >= 2 and re.fullmatch(r"\d{4}-\d{2}-\d{2}\.json", parts[-1]):
                    files.append((parts[-2], z.read(name).decode("utf-8")))
    else:
        for day in sorted(path.glob("*/*.json")):
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}\.json", day.name):
                files.append((day.parent.name, day.read_text(encoding="utf-8")))
    if not files:
        raise ValueError(f"{path}: no Slack channel files (<channel>/YYYY-MM-DD.json) found")
    out: list[CorpusMessage] = []
    for channel, text in files:
        for m in json.loads(text):
            if not isinstance(m, dict) or m.get("type") != "message" or m.get("subtype") not in _SLACK_KEPT_SUBTYPES:
                continue
            if m.get("bot_id") or not m.get("user") or "ts" not in m:
                continue
            body = str(m.get("text", ""))
            if m.get("subtype") == "me_message":
                body = f"/me {body}"
            out.append(CorpusMessage(float(m["ts"]), channel, str(m["user"]), body))
    out.sort(key=lambda c: c.ts)
    return out


_IRSSI_OPENED = re.compile(r"^--- Log opened \w{3} (\w{3} \d{1,2} \d{2}:\d{2}:\d{2} \d{4})")
_IRSSI_DAY = re.compile(r"^--- Day changed \w{3} (\w{3} \d{1,2} \d{4})")
_IRSSI_MSG = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2}))? <[ @+%~&]?([^>]+)> ?(.*)$")
_IRSSI_ACTION = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2}))?  ?\* (\S+) (.*)$")
_WEECHAT = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\t([^\t]*)\t(.*)$")
_WEECHAT_EVENTS = {"-->", "<--", "--", "=!=", ""}


def read_irc_log(path: str | Path, room: str | None = None) -> list[CorpusMessage]:
    """The messages of one irssi or weechat log file (format detected per line), in file order.

    Times are UTC. An irssi line before any ``Log opened`` / ``Day changed`` line has no date and
    raises ValueError naming the line.
    """
    path = Path(path)
    room = room or path.stem
    out: list[CorpusMessage] = []
    day: datetime | None = None
    for n, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.rstrip("\r\n")
        if m := _WEECHAT.match(line):
            stamp, nick, text = m.groups()
            ts = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
            if nick.strip() in _WEECHAT_EVENTS:
                continue
            if nick.strip() == "*":  # weechat action: "nick does something"
                actor, _, rest = text.partition(" ")
                out.append(CorpusMessage(ts, room, actor.lstrip(_NICK_MODES), f"/me {rest}"))
                continue
            out.append(CorpusMessage(ts, room, nick.strip().lstrip(_NICK_MODES), text))
            continue
        if m := _IRSSI_OPENED.match(line):
            day = datetime.strptime(m.group(1), "%b %d %H:%M:%S %Y").replace(tzinfo=UTC)
            continue
        if m := _IRSSI_DAY.match(line):
            day = datetime.strptime(m.group(1), "%b %d %Y").replace(tzinfo=UTC)
            continue
        msg, action = _IRSSI_MSG.match(line), _IRSSI_ACTION.match(line)
        if msg is None and action is None:
            continue  # joins, quits, topics, "-!-" notices
        if day is None:
            raise ValueError(f"{path}:{n}: a message before any 'Log opened' or 'Day changed' line")
        hh, mm, ss, nick, text = (msg or action).groups()  # type: ignore[union-attr]
        ts = day.replace(hour=int(hh), minute=int(mm), second=int(ss or 0)).timestamp()
        out.append(CorpusMessage(ts, room, nick.strip().lstrip(_NICK_MODES), f"/me {text}" if action else text))
    return out


def _csv_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def read_csv(path: str | Path) -> list[CorpusMessage]:
    """The rows of a CSV file with ``ts``, ``room``, ``sender`` and ``text`` columns (other columns
    ignored). Raises ValueError naming a missing column or a row whose ``ts`` does not parse."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"ts", "room", "sender", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        out = []
        for n, row in enumerate(reader, 2):
            try:
                ts = _csv_time(row["ts"])
            except ValueError:
                raise ValueError(f"{path}:{n}: ts {row['ts']!r} is neither seconds nor ISO 8601") from None
            out.append(CorpusMessage(ts, row["room"], row["sender"], row["text"]))
    return out


def write_replay(messages: Iterable[CorpusMessage], out: str | Path) -> dict[str, int]:
    """Write ``messages`` as a replay file at ``out`` (see the module docstring); returns
    ``{"messages", "rooms", "senders"}``."""
    ordered = sorted(messages, key=lambda c: c.ts)
    start = ordered[0].ts if ordered else 0.0
    senders: dict[str, str] = {}
    rooms: dict[str, str] = {}
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for m in ordered:
            sender = senders.setdefault(m.sender, f"u{len(senders) + 1}")
            room = rooms.setdefault(m.room, f"r{len(rooms) + 1}")
            rec = {"ts": round(m.ts - start, 3), "room": room, "sender": sender, "len": len(m.text.encode())}
            rec["text"] = m.text
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"messages": len(ordered), "rooms": len(rooms), "senders": len(senders)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m drivers.importers {slack,irc,csv} ...``: write a replay file; exit 2 on a bad input."""
    p = argparse.ArgumentParser(prog="python -m drivers.importers", description="Chat logs to the replay format.")
    sub = p.add_subparsers(dest="source", required=True)
    s = sub.add_parser("slack", help="a Slack export folder or .zip")
    s.add_argument("export")
    s.add_argument("out")
    i = sub.add_parser("irc", help="irssi or weechat logs, one room per file")
    i.add_argument("logs", nargs="+")
    i.add_argument("out")
    c = sub.add_parser("csv", help="a CSV file with ts, room, sender, text columns")
    c.add_argument("file")
    c.add_argument("out")
    args = p.parse_args(argv)
    try:
        if args.source == "slack":
            msgs = read_slack_export(args.export)
        elif args.source == "irc":
            msgs = [m for log in args.logs for m in read_irc_log(log)]
        else:
            msgs = read_csv(args.file)
    except (OSError, ValueError) as exc:
        print(f"drivers.importers: {exc}", file=sys.stderr)
        return 2
    counts = write_replay(msgs, args.out)
    print(f"wrote {args.out}: {counts['messages']} messages, {counts['rooms']} rooms, {counts['senders']} senders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
