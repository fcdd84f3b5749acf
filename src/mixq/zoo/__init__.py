"""Demo, test and benchmark support, kept apart from the library: registered example models (``models``), the
MNIST / CIFAR-10 readers (``data``) and downloader (``download``), the NNI tutorial's assets (``tutorial``,
``nni_assets``), measurements (``metrics``), the fp8 export-parity check (``fp8_parity``), the cuda kernels'
random cases (``cuda_cases``), trained weights (``pretrained``) and ``mixq demo`` (``demo``). Import the
submodule you need."""
