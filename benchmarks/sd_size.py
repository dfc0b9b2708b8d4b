"""The SD-size VAE every benchmark measures: the architecture of SD 1.x/2.x and SDXL's VAE (random
weights, since none can be downloaded here). One definition; the benchmark scripts import it."""

SD_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
