"""The cycle and its stages, one file each: data (``data_stage``), a generation's k fold models and
predictions (``generation``), pseudo labels (``selection``), the final gate and submissions
(``final_stage``), the reference models (``references``), and the loop that runs them (``runner``)."""
