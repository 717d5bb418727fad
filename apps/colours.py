"""The token-view colours, shared by the demo's token view and the offline feature dashboards."""

ACTIVATION_RGB = "255, 120, 0"  # a token's background: this colour at opacity activation / max
SPECIAL_OUTLINE = "1px dashed #5b6cff"  # special and role tokens
