"""The word lists of :class:`~equilibrate_pl.data.fdc.RuleCategorizer`: explicit-risk terms,
harmful-intent cues and benign look-alikes removed before matching (regex fragments; the
categorizer adds word boundaries)."""

from __future__ import annotations

# Explicit risk: words that are risky on their face, whatever the intent. Categories, not slurs:
# hate speech is caught by the words people use to ask for it ("slur", "racist joke"), so this
# file never spells one out.
EXPLICIT_TERMS: dict[str, list[str]] = {
    "weapons": [r"guns?", r"firearms?", r"rifles?", r"pistols?", r"shotguns?", r"handguns?", r"ar-?15", r"ak-?47",
                r"ammo", r"ammunition", r"bullets?", r"silencers?", r"grenades?", r"machetes?", r"knives", r"knife",
                r"sword", r"weapons?", r"crossbow"],
    "explosives": [r"bombs?", r"explosives?", r"dynamite", r"detonat\w*", r"c-?4", r"ied", r"molotov", r"pipe bomb",
                   r"napalm", r"thermite", r"tnt"],
    "violence": [r"kill\w*", r"murder\w*", r"stab\w*", r"shoot\w*", r"shot", r"strangl\w*", r"poison\w*", r"tortur\w*",
                 r"assault\w*", r"behead\w*", r"massacre\w*", r"genocide", r"terroris\w*", r"kidnap\w*", r"beat (?:him|her|them|you|someone|up)",
                 r"punch\w*", r"slap\w*", r"choke", r"dead", r"die", r"blood\w*", r"hit (?:him|her|them|my|your)", r"lynch\w*",
                 r"violen\w*", r"abus\w*", r"hostage"],
    "drugs": [r"cocaine", r"coke", r"heroin", r"meth", r"methamphetamine", r"crack", r"fentanyl", r"lsd", r"mdma",
              r"ecstasy", r"dmt", r"opioids?", r"opiates?", r"oxy\w*", r"weed", r"marijuana", r"cannabis", r"pot",
              r"drugs?", r"overdos\w*", r"od", r"moonshine", r"get(?:ting)? high", r"stoned", r"drunk", r"alcohol\w*",
              r"narcotics?", r"pills", r"shrooms", r"ketamine", r"xanax", r"smoke"],
    "sexual": [r"sex\w*", r"porn\w*", r"nudes?", r"naked", r"orgasm\w*", r"blow ?jobs?", r"dick\w*", r"puss(?:y|ies)",
               r"penis\w*", r"vagina\w*", r"boobs?", r"tits?", r"erotic\w*", r"prostitut\w*", r"hookers?", r"escorts?",
               r"horny", r"masturbat\w*", r"fetish\w*", r"rap(?:e|ed|es|ing|ist)", r"molest\w*", r"incest", r"pedophil\w*",
               r"strip(?:per|club)s?", r"genital\w*", r"cum", r"anal", r"threesome", r"seduc\w*", r"sleep with", r"hook up"],
    "minors": [r"pre-?teens?", r"underage", r"minors?", r"child porn\w*", r"kiddie", r"young girls?", r"little (?:girls?|boys?)"],
    "hate": [r"racis\w*", r"slurs?", r"nazis?", r"white (?:supremac\w*|power|nationalis\w*)", r"kkk", r"n-?word", r"bigot\w*",
             r"homophob\w*", r"transphob\w*", r"xenophob\w*", r"antisemit\w*", r"hate speech", r"ethnic cleansing",
             r"inferior race", r"hitler"],
    "profanity": [r"fuck\w*", r"shit\w*", r"bitch\w*", r"cunts?", r"assholes?", r"bastards?", r"whores?", r"sluts?",
                  r"retard\w*", r"damn", r"piss\w*", r"motherfuck\w*", r"dumbass\w*", r"jackass\w*"],
    "cyber": [r"hack\w*", r"malware", r"ransomware", r"phishing", r"ddos", r"keylogger\w*", r"spyware", r"botnet",
              r"virus", r"trojan", r"sql injection", r"brute[- ]force", r"crack(?:ing)? (?:a |the )?password\w*"],
    "crime": [r"counterfeit\w*", r"launder\w*", r"traffick\w*", r"smuggl\w*", r"extort\w*", r"arson", r"burglar\w*",
              r"robber(?:y|ies)", r"crimes?", r"criminal\w*", r"illegal\w*", r"felon\w*", r"terror\w*", r"cartel", r"mafia"],
    "self_harm": [r"suicid\w*", r"self[- ]harm\w*", r"kill myself", r"cut(?:ting)? myself", r"end my life", r"slit\w*"],
}

# Harmful intent without needing an explicit term: evasion, revenge, manipulation, contempt,
# targeting a person. These are phrased as patterns because intent lives in constructions.
INTENT_CUES: dict[str, list[str]] = {
    "evasion": [r"without (?:anyone|them|him|her|people|my \w+|getting|being) (?:\w+ )?(?:notic\w*|know\w*|find\w* out|caught|seeing|see)",
                r"get(?:ting)? away with", r"(?:not|never|without) (?:get(?:ting)?|be(?:ing)?) caught", r"untraceabl\w*",
                r"cover (?:it |this |my tracks |up)", r"no one (?:will )?(?:know|find out|notice)", r"secretly",
                r"behind (?:his|her|their|my \w+'s) back", r"sneak\w*", r"hide (?:the |a |my )?(?:body|evidence|money)",
                r"in secret", r"anonymous(?:ly)?", r"fake (?:id|identity|name|account)", r"avoid (?:the )?(?:police|cops|taxes)"],
    "revenge": [r"get(?:ting)? back at", r"revenge", r"make (?:him|her|them|someone|people|my \w+) (?:suffer|pay|cry|miserable|regret)",
                r"teach (?:him|her|them|someone) a lesson", r"ruin (?:his|her|their|someone'?s?)", r"pay for what",
                r"get even", r"punish\w*", r"retaliat\w*"],
    "harm_to_person": [r"hurt (?:him|her|them|someone|people|my|a|an|his|her)", r"harm (?:him|her|them|someone|people|my|a|an)",
                       r"injur\w* (?:him|her|them|someone)", r"(?:get|make) (?:him|her|them) (?:sick|fired|arrested|kicked out)",
                       r"torment\w*", r"bull(?:y|ies|ying)", r"harass\w*", r"stalk\w*", r"intimidat\w*", r"threat\w*",
                       r"blackmail\w*", r"spy(?:ing)? on", r"track (?:his|her|their|someone'?s?) ", r"trip (?:him|her|them|someone)",
                       r"slippery", r"ruin\w*", r"sabotag\w*", r"destroy (?:his|her|their)", r"frame (?:him|her|them|someone)",
                       r"humiliat\w*", r"embarrass (?:him|her|them|someone)", r"prank\w*", r"get rid of (?:him|her|them|my)",
                       # a violent verb aimed at a person: the intent is in the target, whatever the verb
                       r"(?:attack|overpower|captur|hunt(?:ing)? down|eradicat|butcher|crush|shatter|hammer|terminat|liquidat|decimat|"
                       r"eliminat|wip(?:e|ing) out|destroy|strangl|drown|smother|maim|disfigur|cripple|break)\w* "
                       r"(?:a |an |the |my |his |her |their |all )?(?:\w+ )?(?:someone'?s?|somebody|person|people|human'?s?|humans|man|woman|women|"
                       r"child|children|kids?|baby|wife|husband|ex|population|neighbou?r|boss|teacher|girlfriend|boyfriend|family)\b",
                       r"(?:someone|somebody|a human|a person|my \w+)'s (?:head|face|skull|spine|neck|life|death|legs?|arms?)",
                       r"plan (?:someone|somebody)'?s? (?:death|murder)"],
    "deception": [r"trick\w* (?:him|her|them|someone|people|my|into)", r"manipulat\w*", r"scam\w*", r"con (?:him|her|them|someone|people)",
                  r"lie to", r"lying to", r"cheat\w*", r"decei\w*", r"fool (?:him|her|them|someone|people)", r"gaslight\w*",
                  r"pretend to be", r"impersonat\w*", r"forg(?:e|ed|ing|ery)", r"fake (?:a|an|my|the)", r"plagiari\w*",
                  r"brainwash\w*", r"persuade \w+ to", r"convince (?:him|her|them|my \w+) to"],
    "theft": [r"steal\w*", r"stole", r"shoplift\w*", r"rob\b", r"robbing", r"break(?:ing)? into", r"pick (?:a |the )?locks?",
              r"take (?:\w+ )?without paying", r"for free without", r"embezzl\w*", r"pickpocket\w*", r"hotwir\w*", r"loot\w*",
              r"skim\w*", r"dine and dash", r"pirat\w*", r"torrent\w*"],
    "privacy": [r"(?:home )?address (?:of|for)", r"where (?:does|do|did) (?:\w+ ){1,3}live", r"social security number",
                r"phone number (?:of|for)", r"find out where", r"personal information", r"credit card (?:number|info\w*)",
                r"(?:his|her|their) password", r"locate (?:him|her|them|someone|my)", r"dox\w*", r"home address", r"email address (?:of|for)",
                r"private (?:info\w*|photos?)"],
    "contempt": [r"insult\w*", r"make fun of", r"mock\w*", r"(?:why|how come) (?:are|do|is|does) (?:all |so many |most )?\w+(?: \w+)? (?:people |men |women |folks )?(?:so|always|such)",
                 r"stupid", r"idiot\w*", r"dumb", r"ugly", r"fat", r"gross", r"disgusting", r"lazy", r"smell\w*", r"annoying",
                 r"worthless", r"pathetic", r"losers?", r"moron\w*", r"crazy", r"hate (?:my|him|her|them|people|those|these|when|it)",
                 r"\w+ people are", r"all (?:\w+ )?(?:men|women|people|immigrants|muslims|jews|christians|blacks|whites|asians|mexicans) (?:are|should)",
                 r"superior", r"inferior", r"deserve to", r"shut (?:him|her|them|you) up", r"roast", r"mean (?:things|joke)", r"rude",
                 # arguing that a group should lose rights: "why should X people not be allowed to ..."
                 r"(?:why|reasons? why) (?:should|must|is it best for) (?:\w+ ){1,4}(?:not|never|be (?:banned|denied|barred)|go through extra|have their)"],
    "wrongdoing": [r"(?:is it|would it be) (?:ok|okay|wrong|bad|fine|acceptable) (?:to|if)", r"even (?:if|though) (?:i'?m|i am) guilty",
                   r"cheap labor", r"evade", r"bribe\w*", r"vandali\w*", r"graffiti", r"trespass\w*", r"poach\w*",
                   r"(?:spike|drug) (?:her|his|their|someone'?s?) drink", r"get (?:her|him) drunk", r"take advantage of",
                   r"control (?:her|him|my wife|my husband|my girlfriend|my boyfriend)", r"discriminat\w*", r"exploit\w*",
                   r"skip (?:school|work|paying)", r"i want to (?:hurt|harm|get|make|ruin|teach|destroy|see)", r"kick (?:him|her|them) out"],
}

# Benign look-alikes: phrases removed before matching so that their risky-looking words do not fire.
BENIGN_PATTERNS: list[str] = [
    r"kill(?:ing|s)? (?:a |the |this |that |my |all |an )?(?:\w+ )?(?:process(?:es)?|task|thread|job|program|app|server|service|session|query|container|pod|tab|window|time|lights?|engine|music|mood|weeds?|bugs?|germs?|bacteria|mosquito\w*|ants|pests?|mold|conversation|battery)",
    r"kill -9", r"killer (?:app|feature|deal|workout|look)", r"killed it", r"killing it", r"dressed to kill",
    r"shoot(?:ing)? (?:a |the |some |my )?(?:photo\w*|pictures?|video\w*|film|movie|scene|hoops|basket\w*|the breeze|an email|a message|for the stars)",
    r"photo ?shoot", r"execute (?:a |the |my |this )?(?:plan|program|command|script|code|query|order|trade|function)",
    r"(?:drug|gun) (?:store|control|law\w*|polic\w*|test\w*|safety)", r"screenshot\w*", r"bombed (?:my|the|an?) (?:exam|test|interview)",
    r"(?:photo|da) bomb\w*", r"bath bombs?", r"crack (?:an egg|a joke|a smile|the code|open|a window)", r"pot (?:roast|luck|pie|plant|holder)",
    r"crack(?:ing)? (?:my |your )?(?:knuckles|back|neck)", r"dead(?:line|lock|lift)s?", r"coke zero", r"diet coke",
    r"(?:kitchen|butter|steak|bread) knife", r"knife skills", r"fat[- ]free", r"body fat", r"smoke (?:alarm|detector)s?",
    r"hack(?:s|athon)? (?:for|to) (?:productivity|life|cooking|cleaning|studying)", r"life ?hacks?", r"growth hack\w*",
    r"die (?:hard|cast)", r"dice", r"hate (?:it|that) when", r"public (?:address|figure)", r"punching bags?",
    r"steal(?:ing)? (?:a base|the show|someone'?s heart|the spotlight|a kiss)", r"(?:in|on) (?:minecraft|fortnite|a video game|the game|judo|karate|boxing|chess)",
]
