"""The gateway's side of the protocol, sans I/O: `GatewayProtocol` and the actions it asks its host for.

    protocol.py     the session's protocol facts: window, verification, rollbacks, epochs
    actions.py      what the host computes, and the line bookkeeping it follows
    handshake.py    the checks of a hello (new sessions and rebuilt ones alike)
    branches.py     branch drafting: branch lines and their adoption
    resume.py       resuming a session: held here, or rebuilt from the resume hello
    resume_secrets.py  resume secrets: issued, refreshed, checked
    drafts.py       records of drafted and side positions
    stats.py        what `end.stats` reports
"""

from spa.protocol.gateway.actions import (LINE_WORK, MAIN_LINE, Action, CutLine, Draft, DropLine, ForgetStates,
                                          ForkLine, Head, Prefill, ResumeWanted, SendTaps)
from spa.protocol.gateway.handshake import GateCopy, ProjectionCache, Uploads
from spa.protocol.gateway.protocol import GatewayProtocol
from spa.protocol.gateway.resume_secrets import SessionMoved
from spa.protocol.gateway.stats import GatewayStats

__all__ = ["Action", "CutLine", "Draft", "DropLine", "ForgetStates", "ForkLine", "GateCopy", "GatewayProtocol",
           "GatewayStats", "Head", "LINE_WORK", "MAIN_LINE", "Prefill", "ProjectionCache", "ResumeWanted", "SendTaps", "SessionMoved",
           "Uploads"]
