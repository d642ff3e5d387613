"""The report's sections: one module per section (its context) beside one partial under ``templates/`` (its layout).

``family`` dispatches a family's kind to its parts (``KIND_SECTIONS``); ``common`` holds what several share."""
