"""The `minilm-sentences` sentences: 80 paraphrase pairs, 40 distractors, 40 training sentences.

Written for jaxshrink (no third-party text). Each pair says the same thing in different words, so
in the float model the nearest neighbour of most sentences is its partner: top-1 neighbour
agreement between a compressed and the float model is then a meaningful retrieval check.
"""

EVALUATION_PAIRS: tuple[tuple[str, str], ...] = (
  (
    "The cat slept on the warm windowsill all afternoon.",
    "A cat napped in the sunny window for hours.",
  ),
  (
    "The train to Berlin was delayed by forty minutes.",
    "Our Berlin train arrived forty minutes late.",
  ),
  (
    "She planted tomatoes and basil in her back garden.",
    "Basil and tomato plants grow in her backyard.",
  ),
  (
    "The stock market fell sharply after the announcement.",
    "Share prices dropped quickly once the news came out.",
  ),
  (
    "He forgot his umbrella and got soaked on the way home.",
    "Without an umbrella, he was drenched walking home.",
  ),
  (
    "The museum opens at nine and closes at five.",
    "Visiting hours at the museum are from nine to five.",
  ),
  (
    "Regular exercise lowers the risk of heart disease.",
    "Working out often reduces your chance of heart problems.",
  ),
  ("The children built a sandcastle near the water.", "Kids made a castle out of sand by the sea."),
  (
    "Our flight was cancelled because of the snowstorm.",
    "The blizzard forced the airline to cancel our flight.",
  ),
  (
    "The recipe calls for two cups of flour and one egg.",
    "You need one egg and two cups of flour for this recipe.",
  ),
  (
    "The library extended its opening hours during exams.",
    "During the exam period the library stays open longer.",
  ),
  (
    "A quantized model stores each weight in eight bits.",
    "Each weight of the quantized network takes eight bits.",
  ),
  (
    "Pruning removes the weights that matter least.",
    "The least important connections are cut by pruning.",
  ),
  (
    "The laptop battery lasts about ten hours.",
    "This notebook runs roughly ten hours on one charge.",
  ),
  (
    "The river flooded the village after days of rain.",
    "Days of heavy rain made the river overflow into the town.",
  ),
  ("He scored the winning goal in the final minute.", "His goal in the last minute won the match."),
  (
    "The bakery sells fresh bread every morning.",
    "Every morning the bakery has freshly baked loaves.",
  ),
  (
    "The doctor told him to drink more water.",
    "His physician advised him to stay better hydrated.",
  ),
  (
    "The company hired fifty new engineers this year.",
    "Fifty engineers joined the firm during the year.",
  ),
  (
    "Please turn off the lights when you leave the room.",
    "Switch the lights off as you go out of the room.",
  ),
  (
    "The concert was so loud that my ears were ringing.",
    "After the very loud show my ears kept ringing.",
  ),
  (
    "The price of coffee has doubled since last year.",
    "Coffee costs twice as much as it did a year ago.",
  ),
  (
    "The volcano erupted and covered the town in ash.",
    "Ash from the eruption blanketed the nearby town.",
  ),
  ("She learned to play the violin as a child.", "As a young girl she took up the violin."),
  (
    "The bridge will be closed for repairs next week.",
    "Next week the bridge shuts down for maintenance.",
  ),
  ("The new phone has a much better camera.", "The latest phone takes far better photos."),
  ("Wolves hunt in packs during the winter.", "In winter, wolves track their prey in groups."),
  (
    "The meeting was moved from Monday to Wednesday.",
    "We rescheduled the Monday meeting to Wednesday.",
  ),
  ("The software update fixed the login bug.", "After the patch, the login problem was gone."),
  (
    "The hikers reached the summit before sunrise.",
    "The climbers got to the top of the mountain before dawn.",
  ),
  (
    "My grandmother knits scarves for the whole family.",
    "Grandma makes knitted scarves for all of us.",
  ),
  (
    "The referee showed him a red card for the foul.",
    "He was sent off with a red card after fouling.",
  ),
  ("Electric cars are becoming cheaper every year.", "Each year battery powered cars cost less."),
  (
    "The printer on the second floor is out of paper.",
    "There is no paper left in the upstairs printer.",
  ),
  ("The soup needs more salt.", "This soup is not salty enough."),
  (
    "He apologized for arriving late to the interview.",
    "He said sorry for being late to his job interview.",
  ),
  ("Bees are essential for pollinating many crops.", "Many crops depend on bees for pollination."),
  (
    "The restaurant was fully booked on Saturday night.",
    "No tables were free at the restaurant on Saturday evening.",
  ),
  (
    "The students presented their science projects.",
    "The pupils showed their science experiments to the class.",
  ),
  (
    "The ship sailed across the Atlantic in ten days.",
    "Crossing the Atlantic took the vessel ten days.",
  ),
  (
    "Compilers translate source code into machine instructions.",
    "A compiler turns program text into machine code.",
  ),
  (
    "The virus spread quickly through the crowded city.",
    "The infection moved fast through the packed city.",
  ),
  (
    "She won the chess tournament without losing a game.",
    "Undefeated, she took first place in the chess event.",
  ),
  (
    "The highway was jammed with holiday traffic.",
    "Holiday travellers caused a huge traffic jam on the motorway.",
  ),
  (
    "The painting sold for three million dollars at auction.",
    "At the auction the painting fetched three million dollars.",
  ),
  (
    "It is going to rain heavily tomorrow afternoon.",
    "Heavy showers are forecast for tomorrow afternoon.",
  ),
  (
    "The old castle attracts thousands of tourists.",
    "Thousands of visitors come to see the ancient castle.",
  ),
  ("The dog barked at the mail carrier every day.", "Every day the dog barked at the postman."),
  (
    "The bank raised interest rates by half a percent.",
    "Interest rates went up half a point at the central bank.",
  ),
  (
    "He repaired the bicycle with a few simple tools.",
    "A few basic tools were enough to fix his bike.",
  ),
  (
    "The baby finally fell asleep after midnight.",
    "The infant did not fall asleep until past midnight.",
  ),
  (
    "The telescope revealed rings around the distant planet.",
    "Through the telescope we saw the faraway planet's rings.",
  ),
  (
    "The committee approved the new budget.",
    "The new spending plan was accepted by the committee.",
  ),
  (
    "The glacier has shrunk dramatically over the last century.",
    "Over the past hundred years the glacier has melted a lot.",
  ),
  (
    "They adopted a puppy from the animal shelter.",
    "The family took home a young dog from the shelter.",
  ),
  (
    "The keyboard stopped working after I spilled tea on it.",
    "Spilling tea on my keyboard broke it.",
  ),
  (
    "The orchestra rehearsed the symphony all week.",
    "All week the musicians practised the symphony.",
  ),
  (
    "Solar panels on the roof supply most of our electricity.",
    "Most of our power comes from rooftop solar panels.",
  ),
  ("The thief escaped through the back door.", "The burglar got away by the rear entrance."),
  (
    "The lecture on ancient Rome was fascinating.",
    "The talk about the Roman Empire was really interesting.",
  ),
  ("I need to renew my passport before the trip.", "My passport must be renewed before I travel."),
  ("The farmers harvested the wheat in August.", "Wheat was gathered by the farmers in August."),
  (
    "The marathon runners struggled in the heat.",
    "The hot weather made the marathon hard for the runners.",
  ),
  ("The hotel room had a view of the ocean.", "From the hotel room you could see the sea."),
  (
    "Neural networks learn patterns from examples.",
    "A neural network picks up regularities from training data.",
  ),
  (
    "The kettle whistled when the water boiled.",
    "The water boiled and the kettle began to whistle.",
  ),
  (
    "The elevator is out of order, so take the stairs.",
    "Use the stairs because the lift is broken.",
  ),
  (
    "The detective found a clue under the carpet.",
    "A clue was hidden beneath the rug, the investigator discovered.",
  ),
  (
    "Our team finished the project ahead of schedule.",
    "We completed the project earlier than planned.",
  ),
  (
    "The moon looked huge as it rose over the hills.",
    "The rising moon appeared enormous above the hills.",
  ),
  ("The shop offers a discount to students.", "Students get a reduced price at the store."),
  (
    "The earthquake damaged hundreds of buildings.",
    "Hundreds of houses were damaged in the quake.",
  ),
  (
    "He reads a newspaper every morning over breakfast.",
    "Each morning he reads the paper while eating breakfast.",
  ),
  ("The garden was full of roses and tulips.", "Tulips and roses filled the garden."),
  (
    "The password must contain at least twelve characters.",
    "Passwords need to be twelve characters or longer.",
  ),
  ("The parrot can repeat dozens of words.", "That parrot is able to say many different words."),
  (
    "The factory reduced its carbon emissions by a third.",
    "The plant cut its carbon output by one third.",
  ),
  (
    "The kids were excited about the first snow of winter.",
    "The children loved the season's first snowfall.",
  ),
  ("The film won an award for best director.", "The movie's director received the top prize."),
  (
    "Fresh fruit is cheaper at the farmers' market.",
    "The farmers' market sells fruit at lower prices.",
  ),
)

# General-domain sentences for the training/calibration split (none of them is in the
# evaluation pairs): docstring text alone would calibrate activations on technical prose only.
TRAINING_SENTENCES: tuple[str, ...] = (
  "The weather was mild for the first week of December.",
  "A small boat drifted slowly toward the harbour.",
  "The teacher handed back the graded essays on Friday.",
  "Fresh snow covered the mountain pass overnight.",
  "The city council voted to build a new public park.",
  "He spent the weekend painting the fence white.",
  "The nurse checked the patient's temperature every hour.",
  "The band released its third album in the spring.",
  "Traffic lights were out across the whole district.",
  "She ordered a bowl of noodles and a cup of green tea.",
  "The team celebrated the victory late into the night.",
  "Owls hunt mostly at night and sleep during the day.",
  "The airport added a new terminal for international flights.",
  "A strong wind knocked down several trees in the park.",
  "The startup raised ten million dollars from investors.",
  "My neighbour grows peppers on his balcony.",
  "The exhibition features paintings from the last two centuries.",
  "Rainfall was well below average this summer.",
  "The engineer measured the voltage across the resistor.",
  "The novel tells the story of a family over three generations.",
  "Cyclists must use lights after dark.",
  "The bakery closed early because the oven broke.",
  "Scientists discovered a new species of frog in the rainforest.",
  "The hospital opened a new wing for children.",
  "We watched the fireworks from the rooftop.",
  "The database backup runs every night at two.",
  "A thick fog made driving dangerous this morning.",
  "The goalkeeper saved a penalty in the second half.",
  "The tailor shortened the sleeves of the jacket.",
  "Prices at the petrol station rose again this week.",
  "The children fed the ducks at the pond.",
  "The translator worked on the contract for three days.",
  "Heavy machinery is not allowed on the old bridge.",
  "The farmer repaired the fence after the storm.",
  "A new study links poor sleep to weaker memory.",
  "The violinist tuned her instrument before the concert.",
  "The courier delivered the package to the wrong address.",
  "Most of the island is covered by tropical forest.",
  "The programmer rewrote the slow loop in vectorized form.",
  "They hiked along the coast for two days.",
)

# Same topic as a pair, different meaning: near misses that make the nearest-neighbour check
# depend on fine distinctions instead of topic alone.
DISTRACTORS: tuple[str, ...] = (
  "The dog slept on the cold kitchen floor all night.",
  "The train to Berlin left exactly on time.",
  "She pulled the weeds out of her vegetable garden.",
  "The stock market rose steadily for the whole month.",
  "He lent his umbrella to a stranger at the bus stop.",
  "The museum is closed on Mondays for cleaning.",
  "Too much exercise without rest can cause injuries.",
  "The children collected shells along the beach.",
  "Our flight landed early thanks to a strong tailwind.",
  "The recipe works just as well without eggs.",
  "A pruned network can be fine-tuned to recover accuracy.",
  "The laptop screen cracked when it fell off the desk.",
  "The river dried up during the long summer drought.",
  "He missed a penalty in the final minute.",
  "The doctor told him to cut down on sugar.",
  "The company laid off fifty workers this year.",
  "The price of tea has stayed the same for years.",
  "The bridge reopened after the repairs were finished.",
  "The old phone still takes decent pictures.",
  "The meeting on Monday was cancelled altogether.",
  "The software update introduced a new login bug.",
  "The hikers turned back before reaching the summit.",
  "Electric cars still cost more than petrol cars in many countries.",
  "The printer on the second floor jams every morning.",
  "The soup was far too salty to eat.",
  "The restaurant was almost empty on Tuesday night.",
  "Interpreters translate speech from one language to another.",
  "The painting was stolen from the museum last year.",
  "It rained heavily yesterday afternoon.",
  "The cat hissed at the mail carrier.",
  "The bank lowered interest rates by a quarter point.",
  "He sold his old bicycle to a neighbour.",
  "The baby woke up crying just after midnight.",
  "The glacier is growing again after a few cold winters.",
  "They gave their old dog to the animal shelter.",
  "Wind turbines supply most of the town's electricity.",
  "The passport office is closed during the holidays.",
  "The hotel room was small and had no windows.",
  "Neural networks can forget old tasks when trained on new ones.",
  "The lift was repaired, so you can skip the stairs.",
)
