"""The SPA wire protocol, sans I/O: frames, messages and the two state machines.

Import the submodules directly (`spa.protocol.frames`, `.messages`, `.gateway`,
`.device`, `.errors`, `.limits`); this package re-exports nothing, so that
`spa.protocol.codec` can import `spa.protocol.errors` without pulling in the rest.
The specification is docs/PROTOCOL.md.
"""
