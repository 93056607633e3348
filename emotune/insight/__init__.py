"""What a finished search learned: which settings matter, which encoder pair wins, with their uncertainty.

    emotune report                      # the latest search: runs/ray/<search>/summary/report.html
    emotune report --search encoders-20

``record`` reads a finished search from its folder, ``importance`` and ``pairs`` analyse it, ``figures`` draws it
and ``page`` writes the self-contained HTML page that every search also writes at its end.
"""
