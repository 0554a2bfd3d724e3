"""DiffusionPipeline subclasses of ddpm_hf (installed as ``ddpm_hf.pipelines``)."""
