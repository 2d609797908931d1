@echo off
rem imsrc set-up for Windows: an interactive menu, or one subcommand for scripts.
rem   setup.bat install | db | populate [N] [DATASET] | index | serve | test [ARGS] | evaluate [N] | demo | status
setlocal EnableDelayedExpansion
cd /d "%~dp0"
set "PY=.venv\Scripts\python.exe"

if "%~1"=="" goto menu
set "CMD=%~1"
shift
if /i "%CMD%"=="install" goto install
if /i "%CMD%"=="db" goto db
if /i "%CMD%"=="populate" goto populate
if /i "%CMD%"=="index" goto index
if /i "%CMD%"=="serve" goto serve
if /i "%CMD%"=="test" goto test
if /i "%CMD%"=="evaluate" goto evaluate
if /i "%CMD%"=="demo" goto demo
if /i "%CMD%"=="status" goto status
echo unknown command: %CMD% (install, db, populate, index, serve, test, evaluate, demo, status)
exit /b 2

:menu
echo.
echo imsrc set-up
echo   1) Install dependencies
echo   2) Set up the database
echo   3) Populate CIFAR-10
echo   4) Initialise the vector search (prototypes and index)
echo   5) Start the server
echo   6) Run the tests
echo   7) Evaluate two-stage against exhaustive search
echo   8) Show status
echo   q) Quit
set "CHOICE="
set /p "CHOICE=Choose: "
if "%CHOICE%"=="1" call :do_install
if "%CHOICE%"=="2" call :do_run init-db
if "%CHOICE%"=="3" (
  set "N="
  set /p "N=How many images? [1000] "
  if "!N!"=="" set "N=1000"
  call :do_run populate --dataset cifar10 --num-images !N!
)
if "%CHOICE%"=="4" call :do_run rebuild
if "%CHOICE%"=="5" call :do_run serve
if "%CHOICE%"=="6" call :do_test
if "%CHOICE%"=="7" call :do_run evaluate --queries 1000 --json data\evaluation.json
if "%CHOICE%"=="8" call :do_run status
if /i "%CHOICE%"=="q" exit /b 0
goto menu

:install
call :do_install
exit /b %errorlevel%

:db
call :do_run init-db
exit /b %errorlevel%

:populate
set "N=%~1"
set "DS=%~2"
if "%N%"=="" set "N=1000"
if "%DS%"=="" set "DS=cifar10"
call :do_run populate --dataset %DS% --num-images %N%
exit /b %errorlevel%

:index
call :do_run rebuild
exit /b %errorlevel%

:serve
call :do_run serve
exit /b %errorlevel%

:status
call :do_run status
exit /b %errorlevel%

:evaluate
set "N=%~1"
if "%N%"=="" set "N=1000"
if not exist data mkdir data
call :do_run evaluate --queries %N% --json data\evaluation.json
exit /b %errorlevel%

:test
call :do_test %1 %2 %3 %4 %5 %6 %7 %8 %9
exit /b %errorlevel%

:demo
call :do_install || exit /b 1
rem Fashion-MNIST ships in a Debian package, not on Windows: offline, point FASHION_MNIST_DIR at its IDX files.
powershell -NoProfile -Command "try { (New-Object Net.Sockets.TcpClient).Connect('huggingface.co', 443); exit 0 } catch { exit 1 }"
if errorlevel 1 (
  echo no network: using the offline model efficientnet_lite0 and Fashion-MNIST from FASHION_MNIST_DIR
  set "MODEL_NAME=efficientnet_lite0"
  call :do_run populate --dataset fashion-mnist --num-images 2000 || exit /b 1
) else (
  if "%MODEL_NAME%"=="" set "MODEL_NAME=resnet50"
  call :do_run populate --dataset cifar10 --num-images 1000 || exit /b 1
)
call :do_run serve
exit /b %errorlevel%

:do_install
if not exist "%PY%" (
  echo ==^> creating .venv
  python -m venv .venv || (echo imsrc needs Python 3.10 or newer on PATH & exit /b 1)
)
echo ==^> installing Python packages (torch is large: a few minutes the first time)
"%PY%" -m pip install -q --upgrade pip
"%PY%" -m pip install -q -r requirements-dev.txt || exit /b 1
if not exist .env copy .env.example .env >nul
exit /b 0

:do_test
if not exist "%PY%" call :do_install || exit /b 1
"%PY%" -m pytest %*
exit /b %errorlevel%

:do_run
if not exist "%PY%" call :do_install || exit /b 1
"%PY%" -m backend %*
exit /b %errorlevel%
