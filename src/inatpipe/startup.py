"""Imported first by every stage script (the processes DVC starts): no garbage collection while the process imports
torch and the rest. Those imports make about a million objects that live as long as the process, and each full
collection during them walks all of them again: a second or two per stage, every stage, every sweep trial.
`errors.exit_on_user_error` then freezes what the imports made (later collections skip it) and turns collection
back on before the stage's own work starts. Library code never imports this module."""

import gc

gc.disable()
