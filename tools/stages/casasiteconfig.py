# CASA site configuration for the reference calibrate stage: everything offline.
# calibrate.py points CASASITECONFIG here unless the site set its own. The measures and
# other data come from the `casadata` package installed beside casatools; CASA never
# tries to download or update them at run time.
import os as _os

import casadata as _casadata

measurespath = _os.path.join(_os.path.dirname(_casadata.__file__), "__data__")
datapath = [measurespath]
measures_auto_update = False
data_auto_update = False
# `calibrate.py --version` (what `contimg validate` runs) leaves no log file behind.
if _os.environ.get("CONTIMG_CASA_NOLOG") == "1":
    nologfile = True
    logfile = _os.devnull
